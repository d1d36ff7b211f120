"""Run one `glm` command with wall-clock timers around the training loop's phases (no change to glm/).

    /work/venv/bin/python bench/profile_run.py OUT.json finetune --config cfg.yaml [glm flags...]

Wraps, when they exist, the functions glm.train calls (process set-up, dataset, model build, checkpoint
load, optimizer, each TrainStep.run, batch fetches, metrics logging, checkpoint saves, curves) and writes
{phase: seconds} plus the peak RSS after each phase to OUT.json at exit. Everything not covered (Python
start-up is not, the wrapper starts after it) is what the caller's process wall time leaves over.
"""

from __future__ import annotations

import time

T0 = time.perf_counter()

import atexit  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import sys  # noqa: E402
from collections import defaultdict  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TIMES: dict[str, float] = defaultdict(float)
RSS: dict[str, float] = {}
STEPS: list[float] = []


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed(name: str, fn):
    @functools.wraps(fn)
    def wrapper(*a, **k):
        t = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            dt = time.perf_counter() - t
            TIMES[name] += dt
            if name == "train_step":
                STEPS.append(dt)
            RSS.setdefault(name, round(rss_mb()))   # peak so far, the first time the phase ends
    return wrapper


def timed_iter(name: str, fn):
    """A generator function whose every next() is timed (batches are fetched lazily inside the loop)."""
    @functools.wraps(fn)
    def wrapper(*a, **k):
        it = fn(*a, **k)
        while True:
            t = time.perf_counter()
            try:
                item = next(it)
            except StopIteration:
                TIMES[name] += time.perf_counter() - t
                return
            TIMES[name] += time.perf_counter() - t
            yield item
    return wrapper


def patch() -> None:
    import glm.train as tr
    from glm import train_step

    for attr, name in (("init_process", "process_setup"), ("build_model", "model_build+init"),
                       ("build_dataset", "dataset (tokenize+preprocess)"), ("load_checkpoints", "checkpoint_load"),
                       ("build_optimizer", "optimizer_build"), ("save_resolved", "write_config"),
                       ("check_vocab", "check_vocab")):
        if hasattr(tr, attr):
            setattr(tr, attr, timed(name, getattr(tr, attr)))
    train_step.TrainStep.run = timed("train_step", train_step.TrainStep.run)
    for attr, name in (("_save", "checkpoint_save"), ("_save_weights", "weights_save"), ("_plot", "plots"),
                       ("resume", "resume")):
        if hasattr(tr.Trainer, attr):
            setattr(tr.Trainer, attr, timed(name, getattr(tr.Trainer, attr)))
    if hasattr(tr.Trainer, "_batches"):
        tr.Trainer._batches = timed_iter("batch_fetch", tr.Trainer._batches)
    if hasattr(tr, "RunLog"):
        tr.RunLog.metrics = timed("metrics_log", tr.RunLog.metrics)
    init = tr.Trainer.__init__
    tr.Trainer.__init__ = timed("Trainer.__init__ (total)", init)


def dump(path: str, t_imports: float) -> None:
    steps = {"first_step": STEPS[0] if STEPS else 0.0, "second_step": STEPS[1] if len(STEPS) > 1 else 0.0,
             "other_steps": sum(STEPS[2:]), "n_steps": len(STEPS)}
    out = {"imports (glm.cli + glm.train, MindSpore)": t_imports, **TIMES, **steps,
           "wrapper_total": time.perf_counter() - T0, "rss_mb_after": RSS, "peak_rss_mb": round(rss_mb())}
    Path(path).write_text(json.dumps(out, indent=1))


def main() -> None:
    out_path, argv = sys.argv[1], sys.argv[2:]
    import glm.cli
    import glm.train  # noqa: F401  (MindSpore comes with it: part of the import cost)

    t_imports = time.perf_counter() - T0
    RSS["imports"] = round(rss_mb())
    patch()
    atexit.register(dump, out_path, t_imports)
    glm.cli.main(argv)


if __name__ == "__main__":
    main()
