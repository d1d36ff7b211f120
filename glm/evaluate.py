"""`--run_mode eval`: generate on the eval set and score it (ADGEN ROUGE/BLEU), or compute perplexity.

Predictions are appended to `<output_dir>/predictions.jsonl` batch by batch (flushed, so a long eval
can be watched and an interrupted one still leaves its results); the final scores go to
`<output_dir>/metrics.json` and the terminal. Empty predictions are counted and reported loudly.
The eval file's preprocessing statistics go to `<output_dir>/eval_data_stats.json` (not data_stats.json:
eval and finetune share ./output by default, and the training run's data_stats.json must survive).
"""

from __future__ import annotations

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
from glm.io import ensure_dir, write_json_atomic
from glm.metrics import ADGENMetric, PerplexityMetric
from glm.runtime import ms
from glm.settings import DatasetConfig, RunConfig, as_run

STATS_FILE = "eval_data_stats.json"


def run_eval(cfg: RunConfig | dict) -> dict:
    cfg = as_run(cfg)
    proc = init_process(cfg)
    section = cfg.eval_data
    phase = section.data_loader.phase
    metric_type = cfg.metric.type
    out = ensure_dir(cfg.output_dir or "./output")
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


def _limit(section: DatasetConfig, n: int) -> int:
    limit = section.max_eval_samples
    return n if limit in (None, -1, 0) else min(n, int(limit))


def _adgen(cfg: RunConfig, section: DatasetConfig, batch: int, out: Path, write_stats: bool = True) -> dict:
    data = build_dataset(section, batch_size=batch, where="eval_dataset")
    if write_stats:
        write_json_atomic(data.stats, out / STATS_FILE)
    tok = data.tokenizer
    model, lora = build_model(cfg, use_past=True, batch_size=batch)
    check_vocab(tok, model.config, "eval_dataset.tokenizer")
    load_checkpoints(model, cfg.load_checkpoint, lora, required=True, run_mode="eval")
    gen_cfg = generation_config(cfg, tok)
    generator = Generator(model, use_cache=True)
    n = _limit(section, len(data.records))
    metric = ADGENMetric()
    ids_all = data.samples["input_ids"]
    pred_path = out / "predictions.jsonl"
    t0, new_tokens = time.perf_counter(), 0
    with open(pred_path, "w", encoding="utf-8") as f, \
            tqdm(total=n, desc="eval", unit="sample", disable=not sys.stderr.isatty()) as bar:
        for start in range(0, n, batch):
            idx = list(range(start, min(n, start + batch)))
            prompts = [[int(t) for t in ids_all[i] if t != tok.pad_id] for i in idx]
            outputs = generator.generate(prompts, gen_cfg)
            preds = [data.prediction_text(o) for o in outputs]
            records = [data.records[i] for i in idx]
            before = len(metric.per_sample)
            metric.update(preds, [r.answer for r in records], [r.line for r in records])
            for r, p, o, s in zip(records, preds, outputs, metric.per_sample[before:]):
                scores = {k: s[k] for k in ("rouge-1", "rouge-2", "rouge-l", "bleu-4")}
                f.write(json.dumps({"line": r.line, "prompt": r.prompt, "prediction": p, "reference": r.answer,
                                    "new_tokens": len(o), **scores}, ensure_ascii=False) + "\n")
            f.flush()
            new_tokens += sum(len(o) for o in outputs)
            bar.update(len(idx))
            if not bar.disable:
                continue
            print(f"eval {min(n, start + batch)}/{n} samples", flush=True)
    seconds = time.perf_counter() - t0
    result = metric.result()
    result.update(samples_per_s=round(n / seconds, 3), new_tokens_per_s=round(new_tokens / seconds, 1),
                  predictions=str(pred_path))
    for w in metric.warnings():
        print(f"WARNING: {w}", file=sys.stderr, flush=True)
    print("  ".join(f"{k} {result[k]:.4f}" for k in ("rouge-1", "rouge-2", "rouge-l", "bleu-4")), flush=True)
    return result


def _perplexity(cfg: RunConfig, section: DatasetConfig, batch: int, out: Path, write_stats: bool = True) -> dict:
    # Perplexity needs the train-phase layout (prompt + answer + eos, labels shifted and masked with -100),
    # also when only `metric.type: PerplexityMetric` asked for it on an eval-phase block.
    section = dataclasses.replace(section, data_loader=dataclasses.replace(section.data_loader, phase="train"))
    model, lora = build_model(cfg)
    data = build_dataset(section, batch_size=batch, seq_length=model.config.seq_length, where="eval_dataset")
    check_vocab(data.tokenizer, model.config, "eval_dataset.tokenizer")
    if write_stats:
        write_json_atomic(data.stats, out / STATS_FILE)
    load_checkpoints(model, cfg.load_checkpoint, lora, required=True, run_mode="eval")
    model.set_train(False)
    metric = PerplexityMetric()
    n = _limit(section, len(data.records))
    ids, labels = data.samples["input_ids"][:n], data.samples["labels"][:n]
    for start in range(0, n, batch):
        x, y = ids[start:start + batch], labels[start:start + batch]
        if len(x) < batch:   # keep one compiled shape: pad the batch with rows that carry no labels
            x = np.concatenate([x, np.zeros((batch - len(x), x.shape[1]), x.dtype)])
            y = np.concatenate([y, np.full((batch - len(y), y.shape[1]), -100, y.dtype)])
        tokens = int((y != -100).sum())
        if tokens:
            loss = float(model(ms.Tensor(x), ms.Tensor(y)).asnumpy())
            if not math.isfinite(loss):
                raise GLMError(f"eval batch at sample {start}: loss is {loss}")
            metric.update(loss * tokens, tokens)
    result = metric.result()
    result["samples"] = n
    return result
