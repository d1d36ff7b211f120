"""Evaluation during training (`do_eval`), the best checkpoint and early stopping.

At every `eval_step_interval` steps and at the end of every `eval_epoch_interval`-th epoch (MindFormers'
keys; <= 0 disables either) the trainer calls `TrainEvaluator.run`:

* eval loss and perplexity, always: the eval file in the training layout (prompt + answer, the train
  block's lengths and prompt format), teacher-forced through the training model in eval mode;
* ADGEN ROUGE-1/2/L and BLEU-4 on the first `eval_dataset.max_eval_samples` samples when
  `metric.type` is ADGENMetric: greedy generation with a KV-cache copy of the model, prompts in the
  format the model is being trained on (exactly what `--run_mode eval` computes on the saved weights).

In data parallel every rank evaluates its share (samples r, r + world, ...) and the sums are
all-reduced, so every rank sees the global numbers and takes the same best/stop decisions.

Results go to `eval_metrics.jsonl` (one line per evaluation), `metrics.jsonl` and the log. The best
network (or LoRA adapter) by `best_metric` / `greater_is_better` is kept as
`checkpoint_network/rank_<r>/<prefix>_rank_<r>-best.ckpt`, and `best.json` says which step and score.
With `early_stopping_patience` N > 0 training stops after N evaluations in a row without an improvement
(by more than `early_stopping_threshold`). The best-so-far and the patience count are part of the
training checkpoint's meta, so `--resume_training` continues them exactly.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
from tqdm import tqdm

from glm import GLMError
from glm.build import Process, build_model, generation_config
from glm.dataset import build_dataset
from glm.evaluate import generate_and_score, limit_samples, token_loss, with_prompt_format
from glm.io import write_json_atomic, write_text_atomic
from glm.metrics import SCORE_KEYS, ADGENMetric
from glm.prompt_format import data_format
from glm.runtime import ms
from glm.settings import RunConfig

LOSS_METRICS = ("eval_loss", "eval_perplexity")
ADGEN_METRICS = tuple(f"eval_{k}" for k in SCORE_KEYS)
EVAL_LOG = "eval_metrics.jsonl"
BEST_FILE = "best.json"


@dataclass
class EvalSettings:
    step_interval: int        # evaluate when the global step is a multiple of this (<= 0: never)
    epoch_interval: int       # evaluate at the end of every N-th epoch (<= 0: never)
    adgen: bool               # also generate and score ROUGE/BLEU (metric.type ADGENMetric)
    best_metric: str          # eval_loss, eval_perplexity, eval_rouge-1/2/l, eval_bleu-4
    greater_is_better: bool
    patience: int             # 0: no early stopping
    threshold: float


def eval_settings(run: RunConfig) -> Optional[EvalSettings]:
    """The evaluation plan of a training config; None without `do_eval`."""
    if not run.do_eval:
        return None
    step_iv, epoch_iv = run.eval_step_interval, run.eval_epoch_interval
    if step_iv <= 0 and epoch_iv <= 0:
        raise GLMError("do_eval: True but eval_step_interval and eval_epoch_interval are both <= 0 "
                       "(set one of them, e.g. eval_step_interval: 100)")
    run.dataset("eval_dataset")   # a missing block is an error now, not after the first interval
    adgen = run.metric.type == "ADGENMetric"
    name = run.best_metric or "eval_loss"
    name = name if name.startswith("eval_") else f"eval_{name}"   # HF accepts "loss" for "eval_loss"
    known = LOSS_METRICS + (ADGEN_METRICS if adgen else ())
    if name not in known:
        extra = "" if adgen else " (ROUGE/BLEU need metric.type: ADGENMetric)"
        raise GLMError(f"best_metric: expected one of {list(known)}, got {run.best_metric!r}{extra}")
    greater = name not in LOSS_METRICS if run.greater_is_better is None else run.greater_is_better
    return EvalSettings(step_iv, epoch_iv, adgen, name, greater, run.early_stopping_patience,
                        run.early_stopping_threshold)


@dataclass
class BestState:
    """What survives a resume: the best score so far, its step, and evaluations since it."""

    score: Optional[float] = None
    step: Optional[int] = None
    bad_evals: int = 0
    evals: int = 0

    def update(self, score: float, step: int, greater: bool, threshold: float) -> bool:
        """Count one evaluation; True when `score` is a new best."""
        self.evals += 1
        if math.isfinite(score) and (self.score is None or (score - self.score if greater else self.score - score)
                                     > threshold):
            self.score, self.step, self.bad_evals = score, step, 0
            return True
        self.bad_evals += 1
        return False


class TrainEvaluator:
    """Runs the evaluations of one training run; the trainer calls `due`, `run` and `should_stop`."""

    def __init__(self, run: RunConfig, settings: EvalSettings, model, proc: Process, out: Path, batch_size: int,
                 save_best: Callable[[dict], Path]):
        self.config, self.s, self.model, self.proc, self.out = run, settings, model, proc, out
        self.batch, self.save_best = batch_size, save_best
        self.state = BestState()
        train = dataclasses.asdict(run.train_data)
        section = dataclasses.asdict(run.eval_data)
        self.format = data_format(train)
        if data_format(section) != self.format:
            print(f"warning: eval_dataset.data_loader.version {section['data_loader'].get('version')} differs from "
                  f"train_dataset's; evaluating in the training prompt format {self.format}", flush=True)
        # Loss: the eval file in the training layout (the train block's lengths fit seq_length).
        loss_section = with_prompt_format({**section, "max_source_length": train["max_source_length"],
                                           "max_target_length": train["max_target_length"],
                                           "data_loader": {**section["data_loader"], "phase": "train"}},
                                          self.format)
        self.loss_data = build_dataset(loss_section, batch_size=batch_size, seq_length=model.config.seq_length,
                                       where="eval_dataset")
        self.gen_data = self.gen_model = self.generator = None
        if settings.adgen:
            self.gen_data = build_dataset(with_prompt_format(section, self.format), batch_size=batch_size,
                                          where="eval_dataset")
            self.gen_indices = list(range(limit_samples(section, len(self.gen_data.records))))

    # ------------------------------------------------------------------ schedule
    def due(self, step: int, epoch_end: bool, epoch: int) -> bool:
        by_step = self.s.step_interval > 0 and step % self.s.step_interval == 0
        by_epoch = epoch_end and self.s.epoch_interval > 0 and (epoch + 1) % self.s.epoch_interval == 0
        return by_step or by_epoch

    def should_stop(self) -> bool:
        return 0 < self.s.patience <= self.state.bad_evals

    def stop_reason(self) -> str:
        return (f"{self.s.best_metric} did not improve for {self.state.bad_evals} evaluations "
                f"(best {self.state.score:.6g} at step {self.state.step}; early_stopping_patience {self.s.patience})")

    # ------------------------------------------------------------------ resume
    def state_dict(self) -> dict:
        return {**asdict(self.state), "best_metric": self.s.best_metric, "greater_is_better": self.s.greater_is_better}

    def load_state_dict(self, saved: Optional[dict], step: int) -> None:
        """Restore the best-so-far from a training checkpoint's meta; forget evaluations logged after `step`
        (a killed run's, which the resumed run repeats)."""
        if saved and saved.get("best_metric") == self.s.best_metric \
                and saved.get("greater_is_better") == self.s.greater_is_better:
            self.state = BestState(saved.get("score"), saved.get("step"), int(saved.get("bad_evals", 0)),
                                   int(saved.get("evals", 0)))
        elif saved:
            print(f"warning: the checkpoint's best model was chosen by {saved.get('best_metric')} "
                  f"(greater_is_better {saved.get('greater_is_better')}); starting a new best by "
                  f"{self.s.best_metric}", flush=True)
        log = self.out / EVAL_LOG
        if self.proc.is_main and log.is_file():
            lines = log.read_text(encoding="utf-8").splitlines()
            keep = [ln for ln in lines if ln.strip() and json.loads(ln).get("step", 0) <= step]
            if len(keep) != len(lines):
                write_text_atomic(log, "".join(ln + "\n" for ln in keep))

    # ------------------------------------------------------------------ one evaluation
    def run(self, step: int, epoch: int, metrics_log=None) -> dict:
        t0 = time.perf_counter()
        rec: dict = {"step": step, "epoch": epoch + 1}
        rec.update(self._loss())
        if self.s.adgen:
            rec.update(self._adgen())
        rec["eval_time_s"] = round(time.perf_counter() - t0, 3)
        improved = self.state.update(rec[self.s.best_metric], step, self.s.greater_is_better, self.s.threshold)
        best = {"metric": self.s.best_metric, "score": self.state.score, "step": self.state.step,
                "greater_is_better": self.s.greater_is_better}
        if improved:
            path = self.save_best(best)
            if self.proc.is_main:
                write_json_atomic({**best, "epoch": epoch + 1, "checkpoint": str(path), "eval": rec},
                                  self.out / BEST_FILE)
        rec.update(is_best=improved, best={"step": self.state.step, "score": self.state.score,
                                           "evals_without_improvement": self.state.bad_evals})
        if self.proc.is_main:
            if metrics_log is not None:   # glm.runlog.RunLog: metrics.jsonl (+ TensorBoard), stamped with the run id
                rec = metrics_log.metrics(rec, prefix="eval")
            # The whole (small) log rewritten through glm.io: a kill or a full disk never leaves a half line
            # that the resume (load_state_dict) would have to parse.
            log = self.out / EVAL_LOG
            before = log.read_text(encoding="utf-8") if log.is_file() else ""
            write_text_atomic(log, before + json.dumps(rec, ensure_ascii=False) + "\n")
            tqdm.write(self._line(rec))   # above the progress bar; the log file gets it too
        return rec

    def _line(self, rec: dict) -> str:
        parts = [f"eval step {rec['step']}: loss {rec['eval_loss']:.4f} ppl {rec['eval_perplexity']:.3f}"]
        if self.s.adgen:
            parts.append(" ".join(f"{k} {rec[f'eval_{k}']:.2f}" for k in SCORE_KEYS))
        mark = "new best" if rec["is_best"] else f"best {self.state.score:.6g} at step {self.state.step}"
        parts.append(f"({self.s.best_metric} {mark})")
        return "  ".join(parts)

    def _loss(self) -> dict:
        ids, labels = self.loss_data.samples["input_ids"], self.loss_data.samples["labels"]
        mine = slice(self.proc.rank, None, self.proc.world)
        self.model.set_train(False)
        try:
            total, tokens = token_loss(self.model, ids[mine], labels[mine], self.batch)
        finally:
            self.model.set_train(True)
        total, tokens = self._all_sum([total, tokens])
        if tokens == 0:
            raise GLMError("eval_dataset: no target tokens to compute the eval loss on")
        loss = total / tokens
        return {"eval_loss": loss, "eval_perplexity": math.exp(loss) if loss < 700 else math.inf,
                "eval_tokens": int(tokens)}

    def _adgen(self) -> dict:
        if self.gen_model is None:   # built once; then only the weights training changes are copied
            from glm.generate import Generator

            self.gen_model, _ = build_model(self.config, use_past=True, batch_size=self.batch)
            self._copy_weights(self.model.get_parameters())
            self.generator = Generator(self.gen_model, use_cache=True)
            self.gen_cfg = generation_config(self.config, self.gen_data.tokenizer)
        else:
            self._copy_weights(self.model.trainable_params())
        metric = ADGENMetric()
        mine = self.gen_indices[self.proc.rank::self.proc.world]
        generate_and_score(self.generator, self.gen_data, mine, self.gen_cfg, self.batch, metric, progress=False)
        rows = metric.per_sample
        sums = self._all_sum([sum(r[k] for r in rows) for k in SCORE_KEYS]
                             + [len(rows), sum(r["empty_prediction"] for r in rows)])
        n = int(round(sums[len(SCORE_KEYS)]))
        if self.proc.world == 1:   # exactly the numbers `--run_mode eval` prints
            means = {k: v for k, v in metric.result().items() if k in SCORE_KEYS}
        else:
            means = {k: s / n for k, s in zip(SCORE_KEYS, sums)}
        return {**{f"eval_{k}": v for k, v in means.items()}, "eval_samples": n,
                "eval_empty_predictions": int(round(sums[-1]))}

    def _copy_weights(self, source) -> None:
        """The generation model gets the training model's values of the parameters `source`."""
        target = {p.name: p for p in self.gen_model.get_parameters()}
        for p in source:
            if p.name in target:
                target[p.name].set_data(ms.Tensor(p.asnumpy()))

    def _all_sum(self, values: list[float]) -> list[float]:
        if self.proc.world == 1:
            return [float(v) for v in values]
        summed = ms.ops.AllReduce()(ms.Tensor(np.array(values, np.float32))).asnumpy()
        return [float(v) for v in summed]
