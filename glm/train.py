"""`--run_mode train` / `finetune`: the training loop, written out top to bottom.

    set-up -> data -> model (+LoRA) -> weights -> optimizer -> resume -> for each step:
        fetch `gradient_accumulation_steps` micro-batches -> TrainStep.run -> log -> checkpoint

Checkpoints carry everything needed to continue exactly (weights, AdamW moments, loss scale, step,
epoch and position in the epoch, the dropout random state); the data order is a pure function of
(seed, epoch, rank), so a resumed run sees the batches the uninterrupted run would have seen, and
dropout masks are a pure function of (seed, rank, call count) (see glm/dropout.py).
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np
from tqdm import tqdm

from glm import GLMError
from glm.build import Process, build_model, check_vocab, init_process, load_checkpoints, peak_rss_mb
from glm.checkpoint import (
    checkpoint_name,
    fingerprint_mismatch,
    list_checkpoints,
    new_run_prefix,
    params_to_items,
    parse_name,
    prune,
    rank_dir,
    resume_state,
    run_fingerprint,
    save_atomic,
)
from glm.config import save_resolved
from glm.dataset import build_dataset
from glm.dropout import COUNTER_NAME, use_counted_dropout
from glm.io import output_lock, remove_stale_temps, write_json_atomic
from glm.model.glm import count_parameters
from glm.optim import build_optimizer, build_schedule, lr_multiplier
from glm.packing import select_labels
from glm.prompt_format import data_format
from glm.runlog import RunLog, new_run_id, plot_run, run_log, terminal, write_to_log
from glm.runtime import ms
from glm.settings import LossScaleConfig, RunConfig, as_run
from glm.train_eval import TrainEvaluator, eval_settings
from glm.train_step import LossScale, TrainStep


class Trainer:
    def __init__(self, cfg: RunConfig | dict, run_mode: str, proc: Optional[Process] = None):
        self.run = run = as_run(cfg)
        self.cfg, self.run_mode = run.raw, run_mode
        self.proc = proc or init_process(run)
        self.out = Path(run.output_dir)
        runner = run.runner_config
        self.epochs = runner.epochs
        self.batch_size = runner.batch_size
        self.accumulate = runner.gradient_accumulation_steps
        self.max_steps = runner.max_steps
        monitor = run.callback("MFLossMonitor")   # its per_print_times, when set, replaces log_interval
        self.log_interval = (monitor.per_print_times if monitor and monitor.per_print_times
                             else runner.log_interval)
        ckpt = run.checkpoint
        self.base_prefix = ckpt.prefix
        self.prefix: Optional[str] = None   # this run's file prefix: decided by resume() or at the start of train()
        self.save_steps = ckpt.save_checkpoint_steps
        self.keep = ckpt.keep_checkpoint_max

        # Data: every rank preprocesses the file; sharding picks its rows (data parallel only: in
        # semi-auto parallel every rank reads the full batch and MindSpore inserts the gradient reduction).
        from glm.parallel import data_parallel_plan

        shard_data, own_reducer = data_parallel_plan(run, self.proc.world, self.proc.device_target)
        shards = (self.proc.world, self.proc.rank) if shard_data else (None, None)
        self.model, self.lora = build_model(run)
        # Dropout masks from a saveable counter instead of the kernel's hidden RNG (exact resume).
        self.dropout_rng = use_counted_dropout(self.model, run.seed, self.proc.rank)
        self.data = build_dataset(run.train_data, batch_size=self.batch_size,
                                  seq_length=self.model.config.seq_length, num_shards=shards[0],
                                  shard_id=shards[1], pack=run.train_data.packing)
        check_vocab(self.data.tokenizer, self.model.config, "train_dataset.tokenizer")
        self.fingerprint = run_fingerprint(self.model.config, self.lora, self.data.tokenizer)
        self.steps_per_epoch = self.data.num_batches * self.data.repeat // self.accumulate
        if self.steps_per_epoch == 0:
            raise GLMError(f"runner_config.gradient_accumulation_steps {self.accumulate} is larger than the "
                           f"{self.data.num_batches} batches of an epoch")
        self.total_steps = self.steps_per_epoch * self.epochs
        # As HF Trainer: max_steps ends the run early and the schedule spans the steps that will run.
        self.stop_at = self.total_steps if self.max_steps in (None, -1) else min(int(self.max_steps), self.total_steps)
        # The label-only loss's static K: from every batch of the epochs this run plans (not from where a
        # resume starts), so a resumed run and every rank compile the same graph.
        self.label_budget = self.data.label_budget(-(-self.stop_at // self.steps_per_epoch))
        self.base_checkpoint = run.load_checkpoint or ""
        self.loaded = load_checkpoints(self.model, self.base_checkpoint, self.lora,
                                       required=run_mode == "finetune", run_mode=run_mode)
        self.model.set_train(True)
        global_batch = self.batch_size * self.accumulate * self.proc.world
        self.schedule = build_schedule(run.lr_schedule, self.stop_at, self.steps_per_epoch,
                                       scale=lr_multiplier(run.lr_scale, run.lr_scale_factor, global_batch))
        params = self.model.trainable_params()
        self.optimizer = build_optimizer(run.optimizer, params)
        self.loss_scale = self._loss_scale()
        wrapper = run.runner_wrapper
        clip = wrapper.max_grad_norm if wrapper.use_clip_grad else None
        reducer = None
        if own_reducer:   # gradients_mean False sums the ranks' gradients, as MindFormers' recipes do
            reducer = ms.nn.DistributedGradReducer(params, mean=run.parallel.gradients_mean, degree=self.proc.world)
        self.step_fn = TrainStep(self.model, self.optimizer, clip, self.loss_scale, self.accumulate, reducer)
        self.global_step, self.start_epoch, self.skip = 0, 0, 0
        self.run_id = new_run_id()
        self.last_checkpoint: Optional[Path] = None
        self.prompt_format = data_format(dataclasses.asdict(run.train_data))
        settings = eval_settings(run)
        self.evaluator = settings and TrainEvaluator(run, settings, self.model, self.proc, self.out,
                                                     self.batch_size, self._save_best)
        self.nothing_to_do: Optional[str] = None

    # ------------------------------------------------------------------ set-up helpers
    def _loss_scale(self) -> Optional[LossScale]:
        if self.model.config.compute_dtype != "float16":
            return None   # fp32 (and bf16 on devices) needs no loss scaling
        sense = self.run.runner_wrapper.scale_sense
        if sense is None:
            sense = LossScaleConfig()   # float16 without scale_sense: MindSpore's dynamic defaults
        elif not isinstance(sense, dict):
            sense = dataclasses.replace(LossScaleConfig(), type="FixedLossScaleUpdateCell",
                                        loss_scale_value=float(sense))
        else:
            sense = LossScaleConfig(**sense)
        # A fixed scale is a dynamic one whose factor is 1 (MindSpore's FixedLossScaleUpdateCell: overflowing
        # steps are skipped, the scale never changes).
        factor = sense.scale_factor if sense.type == "DynamicLossScaleUpdateCell" else 1
        return LossScale(sense.loss_scale_value, factor, sense.scale_window)

    def _state_params(self) -> list:
        params = list(self.optimizer.params) + list(self.optimizer.exp_avg) + list(self.optimizer.exp_avg_sq)
        params += self.loss_scale.parameters() if self.loss_scale else []
        return params + ([self.dropout_rng.counter] if self.dropout_rng else [])

    def resume(self, resume) -> None:
        found = resume_state(resume, self.out, self.proc.rank, self.base_prefix) if resume else None
        if found is None:
            if resume and resume not in (True, "True", "true", "latest"):
                raise GLMError(f"--resume_training {resume}: nothing to resume from")
            if resume:
                print("resume: no checkpoint found; starting from step 0", file=sys.stderr)
            return
        path, params, meta = found
        why = fingerprint_mismatch(meta.get("fingerprint"), self.fingerprint)
        if why:
            raise GLMError(f"--resume_training {path}: that run had another model or tokenizer ({why}; checkpoint "
                           "vs config); start without --resume_training, or set another --output_dir")
        own = {p.name: p for p in self._state_params()}
        if COUNTER_NAME in own and COUNTER_NAME not in params:   # written before dropout state was saved
            print(f"warning: {path} has no dropout random state; dropout masks will differ from the "
                  "uninterrupted run", file=sys.stderr)
            own.pop(COUNTER_NAME)
        missing = [n for n in own if n not in params]
        if missing:
            raise GLMError(f"--resume_training {path}: not a training checkpoint of this config "
                           f"(missing {missing[0]} and {len(missing) - 1} more)")
        for name, p in own.items():
            if tuple(params[name].shape) != tuple(p.shape):
                raise GLMError(f"--resume_training {path}: {name} has shape {tuple(params[name].shape)} "
                               f"but the model expects {tuple(p.shape)}")
            p.set_data(ms.Tensor(params[name].asnumpy().astype(ms.dtype_to_nptype(p.dtype))))
        self.global_step = int(meta["global_step"])
        self.start_epoch, self.skip = int(meta["epoch"]), int(meta["step_in_epoch"])
        if self.skip >= self.steps_per_epoch:
            self.start_epoch, self.skip = self.start_epoch + 1, 0
        self.last_checkpoint = path
        self.prefix = self._continued_prefix(path, latest=resume in (True, "True", "true", "latest"))
        if self.evaluator:
            self.evaluator.load_state_dict(meta.get("eval_state"), self.global_step)
        print(f"resumed from {path} at step {self.global_step} (epoch {self.start_epoch + 1}, "
              f"step {self.skip} of the epoch)", flush=True)
        self._check_continuation(meta)

    def _check_continuation(self, meta: dict) -> None:
        """A resumed run that has nothing left to do says why in one line; one whose schedule changed
        (a larger --max_steps) says so."""
        step, span = self.global_step, meta.get("schedule_steps")
        if self.evaluator and self.evaluator.should_stop():
            self.nothing_to_do = (f"the run stopped early at step {step}: {self.evaluator.stop_reason()}; raise "
                                  "early_stopping_patience (or set it to 0) to continue")
        elif step >= self.stop_at:
            if self.max_steps not in (None, -1) and int(self.max_steps) > step:
                raise GLMError(f"runner_config.max_steps {self.max_steps}: the checkpoint at step {step} has "
                               f"finished all {self.epochs} epochs x {self.steps_per_epoch} steps; max_steps only "
                               "shortens a run (raise runner_config.epochs to train longer)")
            self.nothing_to_do = (f"the checkpoint is at step {step}, the end of this run ({self._span_text()}); "
                                  "raise --max_steps or --epochs to train further")
        elif span is not None and int(span) != self.schedule.total:
            print(f"resume: the lr schedule now spans {self.schedule.total} steps (the checkpoint's run: {span}); "
                  f"lr at step {step + 1} is {self.schedule(step):.3e}", flush=True)

    def _data_line(self) -> str:
        p = self.data.stats.get("packing") or {}
        rows = (f"{p.get('samples')} samples packed into {p.get('rows')} rows" if self.data.packed
                else f"{p.get('rows')} rows (packing off)")
        pad = 100 * (p.get("padding_after") or 0.0)
        before = f" (unpacked {100 * p['padding_before']:.1f}%)" if self.data.packed else ""
        return (f"data: {rows} of {p.get('row_width')} tokens, padding {pad:.1f}%{before}; label budget "
                f"{self.label_budget} positions per micro-batch")

    def _span_text(self) -> str:
        run = f"{self.epochs} epochs x {self.steps_per_epoch} steps = {self.total_steps}"
        if self.stop_at < self.total_steps:
            return f"max_steps {self.stop_at} of {run}"
        return run

    def _continued_prefix(self, path: Path, latest: bool) -> str:
        """A resumed run writes on under the prefix of the file it resumed from when that file is its run's
        newest in this rank's folder; resuming from an older file (or another folder) starts a new prefix,
        so the later files of that run are not overwritten."""
        parsed = parse_name(path.name)
        here = rank_dir(self.out, self.proc.rank)
        if parsed and path.parent.resolve() == here.resolve() and \
                (latest or list_checkpoints(here, parsed[0])[-1] == path):
            return parsed[0]
        return new_run_prefix(self.out, self.base_prefix)

    # ------------------------------------------------------------------ the loop
    def train(self) -> dict:
        if self.nothing_to_do:
            print(f"nothing to train: {self.nothing_to_do}", flush=True)
            return {"run_mode": self.run_mode, "steps": self.global_step, "nothing_to_do": self.nothing_to_do}
        if self.prefix is None:
            self.prefix = new_run_prefix(self.out, self.base_prefix)
            if self.prefix != self.base_prefix and self.proc.is_main:
                print(f"{self.out} holds files of an earlier run with prefix {self.base_prefix!r}; this run names its "
                      f"own {self.prefix}_rank_*.ckpt and leaves those alone (pass --resume_training to continue "
                      "the earlier run instead)", flush=True)
        for kind in ("checkpoint", "checkpoint_network"):
            for f in remove_stale_temps(rank_dir(self.out, self.proc.rank, kind), depth=1):
                print(f"removed {f}: a temporary file left by a killed run", flush=True)
        if self.proc.is_main:
            save_resolved(self.cfg, self.out)
            write_json_atomic(self.data.stats, self.out / "data_stats.json")
        total, trainable = count_parameters(self.model), count_parameters(self.model, True)
        stop_at = self.stop_at
        print(f"training: {total:,} parameters ({trainable:,} trainable), {self.steps_per_epoch} steps/epoch x "
              f"{self.epochs} epochs, global batch {self.batch_size * self.accumulate * self.proc.world}, "
              f"world {self.proc.world}", flush=True)
        print(self._data_line(), flush=True)
        sched = self.schedule
        print(f"lr schedule: {sched.kind} over {sched.total} steps (run: {self._span_text()}"
              f"{'; lr_schedule.total_steps' if sched.total != stop_at else ''}), warmup {sched.warmup}, "
              f"peak {sched.lr:g}", flush=True)
        log_name = "metrics.jsonl" if self.proc.is_main else f"metrics_rank{self.proc.rank}.jsonl"
        log = RunLog(self.run, self.out, log_name, main=self.proc.is_main, run_id=self.run_id)
        bar = tqdm(total=stop_at, initial=self.global_step, disable=not (self.proc.is_main and sys.stderr.isatty()),
                   dynamic_ncols=True, desc=self.run_mode, file=terminal(sys.stderr))
        seq = self.model.config.seq_length
        first_loss = last_loss = None
        tokens_since, t_steady = 0, None
        t_prev = time.perf_counter()   # step times are wall clock: data, step, logging and saving
        try:
            for epoch in range(self.start_epoch, self.epochs):
                if self.global_step >= stop_at:
                    break
                skip = self.skip if epoch == self.start_epoch else 0
                batches = self._batches(epoch, skip * self.accumulate)
                for step_in_epoch in range(skip, self.steps_per_epoch):
                    if self.global_step >= stop_at:
                        break
                    micro = [next(batches) for _ in range(self.accumulate)]
                    weights = self._weights(micro)
                    lr = self.schedule(self.global_step)
                    loss, finite, norm = self.step_fn.run(micro, weights, lr, self.global_step + 1)
                    if self.proc.world > 1:   # log the global batch's loss, not this rank's share
                        loss = self._all_sum(loss * sum(weights)) / self.proc.world
                    dt, t_prev = time.perf_counter() - t_prev, time.perf_counter()
                    self.global_step += 1
                    first_loss = loss if first_loss is None else first_loss
                    last_loss = loss
                    ntok = sum(m[0].shape[0] * m[0].shape[1] for m in micro)
                    if self.global_step > 2:        # steps 1-2 include graph compilation
                        tokens_since += ntok
                        t_steady = (t_steady or 0.0) + dt
                    rec = {"step": self.global_step, "epoch": epoch + 1, "loss": round(loss, 6), "lr": lr,
                           "grad_norm": round(norm, 6), "finite": finite, "step_time_s": round(dt, 5),
                           "tokens_per_s": round(ntok / dt, 1)}
                    if self.loss_scale:
                        rec["loss_scale"] = float(self.loss_scale.scaler.scale_value.asnumpy())
                    log.metrics(rec)
                    self._check_finite(loss, finite, norm)   # after logging: the bad step is in the log
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{ntok / dt:.0f}")
                    if self.proc.is_main and (self.global_step % self.log_interval == 0 or self.global_step == 1):
                        line = (f"step {self.global_step}/{stop_at} epoch {epoch + 1} loss {loss:.4f} lr {lr:.3e} "
                                f"grad_norm {norm:.3f} {ntok / dt:.0f} tok/s")
                        if bar.disable:
                            print(line, flush=True)
                        else:   # the terminal has the bar; the log file gets the line
                            write_to_log(line)
                    epoch_end = step_in_epoch + 1 == self.steps_per_epoch
                    if self.evaluator and self.evaluator.due(self.global_step, epoch_end, epoch):
                        self.evaluator.run(self.global_step, epoch, log)
                    stopping = bool(self.evaluator and self.evaluator.should_stop())
                    end_of_run = self.global_step >= stop_at or stopping
                    if self.save_steps and (self.global_step % self.save_steps == 0 or end_of_run):
                        self._save(epoch, step_in_epoch + 1, seq)
                    if stopping:
                        print(f"early stopping at step {self.global_step}: {self.evaluator.stop_reason()}",
                              flush=True)
                        stop_at = self.global_step
                        break
        finally:
            bar.close()
            log.close()
        summary = {"run_mode": self.run_mode, "steps": self.global_step, "first_loss": first_loss,
                   "final_loss": last_loss, "steady_tokens_per_s": round(tokens_since / t_steady, 1) if t_steady else None,
                   "peak_rss_mb": round(peak_rss_mb(), 1), "last_checkpoint": str(self.last_checkpoint or ""),
                   "parameters": total, "trainable_parameters": trainable, "label_budget": self.label_budget,
                   "packing": self.data.stats.get("packing"), **log.stamp}
        summary["weights"] = str(self._save_weights())
        if self.proc.is_main:
            summary["plots"] = self._plot()
            write_json_atomic(summary, self.out / "train_summary.json")
        losses = "n/a" if first_loss is None else f"{first_loss:.4f} -> {last_loss:.4f}"
        print(f"done: {self.global_step} steps, loss {losses}; weights: {summary['weights']}", flush=True)
        return summary

    def _plot(self) -> list[str]:
        if not self.run.runner_config.plot_curves:
            return []
        try:
            files = plot_run(self.out)
        except Exception as e:   # the curves are a convenience: never fail a finished run over them
            print(f"warning: could not draw the curves under {self.out / 'plots'}: {e}", file=sys.stderr)
            return []
        print(f"curves: {self.out / 'plots'}/ ({', '.join(f.name for f in files)})", flush=True)
        return [str(f) for f in files]

    def _batches(self, epoch: int, skip_batches: int):
        """The micro-batches of `epoch` as the model takes them: (input_ids, label_ids, positions, segments,
        label_rows); positions and segments are None for unpacked rows (the model's own defaults)."""
        it = self.data.for_epoch(epoch, skip_batches).create_tuple_iterator(num_epochs=1, output_numpy=True)
        for cols in it:
            ids, labels = cols[0].astype(np.int32), cols[1].astype(np.int32)
            positions, segments = (cols[2].astype(np.int32), cols[3].astype(np.int32)) if self.data.packed \
                else (None, None)
            label_rows, label_ids = select_labels(labels, self.label_budget)
            yield ids, label_ids, positions, segments, label_rows

    def _weights(self, micro: list) -> list[float]:
        counts = [float((m[1] != -100).sum()) for m in micro]
        total = self._all_sum(sum(counts)) if self.proc.world > 1 else sum(counts)
        if total == 0:
            return [0.0 for _ in counts]
        return [c * self.proc.world / total for c in counts]

    @staticmethod
    def _all_sum(value: float) -> float:
        return float(ms.ops.AllReduce()(ms.Tensor(np.array([value], np.float32))).asnumpy()[0])

    def _check_finite(self, loss: float, finite: bool, norm: float) -> None:
        """Stop on a non-finite loss, or (without loss scaling, where an overflow just skips the step) on
        non-finite gradients; the message says which, and names the checkpoint to go back to."""
        if math.isfinite(loss) and (finite or self.loss_scale):
            return
        raise GLMError(nonfinite_message(self.global_step, loss, norm, self.last_checkpoint))

    def _meta(self, kind: str, **extra) -> dict:
        rng = {"seed": self.run.seed, "rank": self.proc.rank,
               "dropout_counter": self.dropout_rng.value() if self.dropout_rng else None}
        return {"kind": kind, "global_step": self.global_step, "seed": self.run.seed, "rng": rng,
                # "pet": the tuning settings (LoRA or P-Tuning v2); "lora" kept for older readers.
                "pet": self.lora, "lora": self.lora if (self.lora or {}).get("pet_type") == "lora" else None,
                "base_checkpoint": self.base_checkpoint if self.lora else None, "prompt_format": self.prompt_format,
                "rank": self.proc.rank, "world": self.proc.world, "run_prefix": self.prefix,
                "fingerprint": self.fingerprint, "config": self.cfg, **extra}

    def _save(self, epoch: int, step_in_epoch: int, seq: int) -> None:
        directory = rank_dir(self.out, self.proc.rank)
        path = directory / checkpoint_name(self.prefix, self.proc.rank, epoch + 1, step_in_epoch)
        meta = self._meta("train_state", epoch=epoch, step_in_epoch=step_in_epoch, seq_length=seq,
                          schedule_steps=self.schedule.total,
                          eval_state=self.evaluator.state_dict() if self.evaluator else None)
        self.last_checkpoint = save_atomic(params_to_items(self._state_params()), path, meta)
        prune(directory, self.keep, self.prefix, protect=self.last_checkpoint)

    def _save_weights(self, tag: Optional[str] = None, **extra) -> Path:
        """Weights-only file for eval/predict/merging: the whole model, or just the adapter (LoRA factors
        or the P-Tuning v2 prefix encoder)."""
        kind = "adapter" if self.lora else "network"
        path = rank_dir(self.out, self.proc.rank, "checkpoint_network") / \
            f"{self.prefix}_rank_{self.proc.rank}-{tag or kind}.ckpt"
        params = self.model.trainable_params() if self.lora else self.model.get_parameters()
        return save_atomic(params_to_items(params), path, self._meta(kind, **extra))

    def _save_best(self, best: dict) -> Path:
        return self._save_weights("best", best=best)


def nonfinite_message(step: int, loss: float, norm: float, last_checkpoint: Optional[Path]) -> str:
    if math.isfinite(loss):
        what = (f"the gradients are non-finite (grad norm {norm}) although the loss is finite ({loss:.6g}); "
                "the update was skipped")
    else:
        what = f"the loss is {loss}"
    last = (f"last good checkpoint: {last_checkpoint}" if last_checkpoint
            else "no checkpoint was saved before this step")
    return (f"step {step}: {what}; training stopped, {last}. Lower optimizer/lr_schedule learning_rate, "
            "enable gradient clipping, or check the input weights")


def run_train(cfg: RunConfig | dict, run_mode: str, resume=None) -> dict:
    run = as_run(cfg)
    proc = init_process(run)
    # One writer per output folder (re-entrant: the CLI holds it already for one process); rank 0 holds it
    # for a distributed job.
    with output_lock(run.output_dir, what=run_mode, enabled=proc.is_main), \
            run_log(run) as run_id:   # output_dir/log/glm.log (the CLI has usually opened it already)
        trainer = Trainer(run, run_mode, proc)
        trainer.run_id = run_id
        trainer.resume(resume if resume is not None else run.resume_training)
        return trainer.train()


__all__ = ["Trainer", "run_train", "list_checkpoints"]
