"""`--run_mode eval`: generate on the eval set and score it (ADGEN ROUGE/BLEU), or compute perplexity.

Predictions are appended to `<output_dir>/predictions.jsonl` batch by batch (flushed, so a long eval
can be watched and an interrupted one still leaves its results); the final scores go to
`<output_dir>/metrics.json` and the terminal. Empty predictions are counted and reported loudly.
The eval file's preprocessing statistics go to `<output_dir>/eval_data_stats.json` (not data_stats.json:
eval and finetune share ./output by default, and the training run's data_stats.json must survive).
Prompts are in the format the checkpoint was fine-tuned with (glm/prompt_format.py), which may differ
from the eval block's `data_loader.version` (a warning names both); `prompt_format` overrides it.

`generate_and_score` and `token_loss` are shared with evaluation during training (glm/train_eval.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from glm import GLMError
from glm.build import build_model, check_vocab, generation_config, init_process, load_checkpoints
from glm.dataset import build_dataset
from glm.generate import Generator
from glm.io import ensure_dir, os_error, write_json_atomic
from glm.metrics import SCORE_KEYS, ADGENMetric, PerplexityMetric
from glm.packing import round_budget, select_labels
from glm.prompt_format import FORMAT_VERSIONS, data_format, recorded_format, resolve_prompt_format
from glm.runtime import ms
from glm.settings import RunConfig, as_run

STATS_FILE = "eval_data_stats.json"


def run_eval(cfg: RunConfig | dict) -> dict:
    cfg = as_run(cfg)
    proc = init_process(cfg)
    section = dataclasses.asdict(cfg.eval_data)
    phase = cfg.eval_data.data_loader.phase
    metric_type = cfg.metric.type
    out = ensure_dir(cfg.output_dir)
    if proc.is_main:   # an earlier run's scores must not sit beside this run's predictions if this one fails
        (out / "metrics.json").unlink(missing_ok=True)
    batch = cfg.runner_config.batch_size
    if metric_type == "PerplexityMetric" or phase == "train":
        result = _perplexity(cfg, section, batch, out, proc.is_main)
    else:
        result = _adgen(cfg, section, batch, out, proc.is_main)
    result["checkpoint"] = cfg.load_checkpoint
    if proc.is_main:
        write_json_atomic(result, out / "metrics.json")
    print(json.dumps({k: v for k, v in result.items() if k != "checkpoint"}, ensure_ascii=False), flush=True)
    return result


def limit_samples(section: dict, n: int) -> int:
    limit = section.get("max_eval_samples")
    return n if limit in (None, -1, 0) else min(n, int(limit))


def with_prompt_format(section: dict, fmt: str, where: str = "eval_dataset") -> dict:
    """The dataset block with its data_loader.version set to the one that produces prompt format `fmt`."""
    if data_format(section) == fmt:
        return section
    if (section.get("data_loader") or {}).get("format") == "conversations":
        raise GLMError(f"{where} holds conversations (ChatGLM3's chat template, glm3_chat) but the prompt format "
                       f"is {fmt}; set prompt_format: glm3_chat or use ADGEN-style data")
    if fmt not in FORMAT_VERSIONS:
        raise GLMError(f"prompt format {fmt} is not available for ADGEN data (data_loader.version "
                       + ", ".join(f"{v} = {f}" for f, v in FORMAT_VERSIONS.items()) + f"); set {where} "
                       "prompt_format to one of those")
    return {**section, "data_loader": {**(section.get("data_loader") or {}), "version": FORMAT_VERSIONS[fmt]}}


def _load(cfg: RunConfig, model, lora, section: dict) -> dict:
    """Load the checkpoint; return the eval block in the prompt format it was fine-tuned with."""
    metas: list[dict] = []
    load_checkpoints(model, cfg.load_checkpoint, lora, required=True, run_mode="eval", metas=metas)
    version = section["data_loader"]["version"]
    fmt = resolve_prompt_format(cfg.prompt_format, recorded_format(metas), data_format(section),
                                f"eval_dataset.data_loader.version {version}")
    print(f"prompt format: {fmt}", flush=True)
    return with_prompt_format(section, fmt)


def generate_and_score(generator: Generator, data, indices: list[int], gen_cfg, batch: int, metric: ADGENMetric,
                       pred_file=None, progress: bool = True) -> int:
    """Generate answers for eval samples `indices` (batches of `batch`), score them into `metric`, write
    one JSON line per sample to `pred_file` if given; returns the number of new tokens."""
    tok, ids_all = data.tokenizer, data.samples["input_ids"]
    new_tokens, n = 0, len(indices)
    with tqdm(total=n, desc="eval", unit="sample", disable=not (progress and sys.stderr.isatty())) as bar:
        for start in range(0, n, batch):
            idx = indices[start:start + batch]
            prompts = [[int(t) for t in ids_all[i] if t != tok.pad_id] for i in idx]
            outputs = generator.generate(prompts, gen_cfg)
            preds = [data.prediction_text(o) for o in outputs]
            records = [data.records[i] for i in idx]
            before = len(metric.per_sample)
            metric.update(preds, [r.answer for r in records], [r.line for r in records])
            if pred_file is not None:
                for r, p, o, s in zip(records, preds, outputs, metric.per_sample[before:]):
                    scores = {k: s[k] for k in SCORE_KEYS}
                    pred_file.write(json.dumps({"line": r.line, "prompt": r.prompt, "prediction": p,
                                                "reference": r.answer, "new_tokens": len(o), **scores},
                                               ensure_ascii=False) + "\n")
                pred_file.flush()
            new_tokens += sum(len(o) for o in outputs)
            bar.update(len(idx))
            if progress and bar.disable:
                print(f"eval {min(n, start + batch)}/{n} samples", flush=True)
    return new_tokens


def token_loss(model, ids: np.ndarray, labels: np.ndarray, batch: int) -> tuple[float, int]:
    """(summed token cross-entropy, target tokens) of train-layout rows, teacher-forced in batches of
    `batch` (the last batch padded with label-free rows, so one graph shape is compiled).

    The loss is the label-only one: logits only at the K labelled positions of a batch, K the largest
    label count of these batches rounded up to a multiple of 16 (one K per call: one graph)."""
    counts = (labels != -100).sum(axis=1)
    budget = round_budget(max((int(counts[s:s + batch].sum()) for s in range(0, len(ids), batch)), default=0))
    total, count = 0.0, 0
    for start in range(0, len(ids), batch):
        x, y = ids[start:start + batch], labels[start:start + batch]
        if len(x) < batch:
            x = np.concatenate([x, np.zeros((batch - len(x), x.shape[1]), x.dtype)])
            y = np.concatenate([y, np.full((batch - len(y), y.shape[1]), -100, y.dtype)])
        tokens = int((y != -100).sum())
        if tokens:
            rows, label_ids = select_labels(y, budget)
            loss = float(model(ms.Tensor(x), ms.Tensor(label_ids), None, None, ms.Tensor(rows)).asnumpy())
            if not math.isfinite(loss):
                raise GLMError(f"eval batch at sample {start}: loss is {loss}")
            total += loss * tokens
            count += tokens
    return total, count


def _adgen(cfg: RunConfig, section: dict, batch: int, out: Path, main: bool = True) -> dict:
    model, lora = build_model(cfg, use_past=True, batch_size=batch)
    section = _load(cfg, model, lora, section)
    data = build_dataset(section, batch_size=batch, where="eval_dataset")
    check_vocab(data.tokenizer, model.config, "eval_dataset.tokenizer")
    if main:
        write_json_atomic(data.stats, out / STATS_FILE)
    gen_cfg = generation_config(cfg, data.tokenizer)
    generator = Generator(model, use_cache=True)
    n = limit_samples(section, len(data.records))
    metric = ADGENMetric()
    pred_path = out / "predictions.jsonl"
    t0 = time.perf_counter()
    # Streamed (flushed per batch, to be watched); one writer: every rank generates the same samples.
    try:
        pred_file = open(pred_path, "w", encoding="utf-8") if main else contextlib.nullcontext()
    except OSError as e:
        raise os_error(e, pred_path) from None
    with pred_file as f:
        new_tokens = generate_and_score(generator, data, list(range(n)), gen_cfg, batch, metric, f)
    seconds = time.perf_counter() - t0
    result = metric.result()
    result.update(samples_per_s=round(n / seconds, 3), new_tokens_per_s=round(new_tokens / seconds, 1),
                  predictions=str(pred_path))
    for w in metric.warnings():
        print(f"WARNING: {w}", file=sys.stderr, flush=True)
    print("  ".join(f"{k} {result[k]:.4f}" for k in SCORE_KEYS), flush=True)
    return result


def _perplexity(cfg: RunConfig, section: dict, batch: int, out: Path, write_stats: bool = True) -> dict:
    # Perplexity needs the train-phase layout (prompt + answer + eos, labels shifted and masked with -100),
    # also when only `metric.type: PerplexityMetric` asked for it on an eval-phase block.
    section = {**section, "data_loader": {**(section.get("data_loader") or {}), "phase": "train"}}
    model, lora = build_model(cfg)
    section = _load(cfg, model, lora, section)
    data = build_dataset(section, batch_size=batch, seq_length=model.config.seq_length, where="eval_dataset")
    check_vocab(data.tokenizer, model.config, "eval_dataset.tokenizer")
    if write_stats:
        write_json_atomic(data.stats, out / STATS_FILE)
    model.set_train(False)
    n = limit_samples(section, len(data.records))
    metric = PerplexityMetric()
    metric.update(*token_loss(model, data.samples["input_ids"][:n], data.samples["labels"][:n], batch))
    result = metric.result()
    result["samples"] = n
    return result
