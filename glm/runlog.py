"""What a run leaves to look at: its log file, a run id on every record, curves and TensorBoard events.

    output_dir/log/glm.log          everything the terminal shows (plus warnings), appended run after run
    output_dir/metrics.jsonl        one line per step, each stamped with run_id and config_hash
    output_dir/plots/*.png          loss, learning rate, grad norm, tokens/s, eval metrics: one curve per run id
    <tensorboard_dir>/<run_id>/     TensorBoard event files with the same scalars (tensorboard.tensorboard_dir)

A run id (`20261201-061700-3fa2`: start time + 4 random hex digits) tells apart the runs that append to
the same output folder (a first run, then `--resume_training`); the config hash says whether two runs
trained the same thing. `plot_run(run_dir)` (`glm plot RUN_DIR`) redraws the curves from the files at any
time, also while a run is still writing them.

Distributed ranks get no glm.log from here: their launcher already writes each rank's output to
output_dir/log/rank_k/glm.log.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import secrets
import sys
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional, TextIO

from glm import GLMError
from glm.io import ensure_dir, os_error, write_bytes_atomic
from glm.settings import RunConfig, as_run

LOG_NAME = "log/glm.log"
PLOTS = "plots"
# Keys of the resolved config that say where and whether to continue, not what is trained: left out of
# the hash so that a resumed run (or the same config in another folder) hashes like the first one.
UNHASHED_KEYS = ("resume_training", "output_dir")
# metrics.jsonl fields drawn as curves: field -> (file stem, y-axis label).
TRAIN_CURVES = {
    "loss": ("loss", "training loss (mean token cross-entropy)"),
    "lr": ("learning_rate", "learning rate"),
    "grad_norm": ("grad_norm", "global gradient norm (before clipping)"),
    "tokens_per_s": ("tokens_per_s", "tokens / s (wall clock)"),
    "loss_scale": ("loss_scale", "loss scale"),
}
# Numeric fields of eval_metrics.jsonl that are positions or counts, not metrics.
NOT_EVAL_METRICS = frozenset({"step", "epoch", "samples", "global_step", "empty_predictions", "time",
                              "elapsed_s", "eval_time_s", "eval_samples", "eval_tokens", "eval_empty_predictions"})


def new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(2)


def config_hash(cfg: dict) -> str:
    """12 hex digits of SHA-256 over the resolved config (keys sorted), without UNHASHED_KEYS."""
    kept = {k: v for k, v in cfg.items() if k not in UNHASHED_KEYS}
    text = json.dumps(kept, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]


# ------------------------------------------------------------------------------------------ log file
class _Tee(io.TextIOBase):
    """A text stream that writes to the terminal stream it replaces and to the log file."""

    def __init__(self, stream: TextIO, log: TextIO):
        super().__init__()
        self.stream, self.log = stream, log

    def write(self, s: str) -> int:
        self.stream.write(s)
        if not self.log.closed:
            self.log.write(s)
            if "\n" in s:
                self.log.flush()
        return len(s)

    def flush(self) -> None:
        self.stream.flush()
        if not self.log.closed:
            self.log.flush()

    def isatty(self) -> bool:
        return self.stream.isatty()

    def fileno(self) -> int:
        return self.stream.fileno()

    @property
    def encoding(self) -> str:
        return getattr(self.stream, "encoding", "utf-8")


@contextmanager
def log_to_file(path: Optional[Path], header: str = "") -> Iterator[Optional[TextIO]]:
    """Copy sys.stdout and sys.stderr into `path` (appending) while the block runs; None: do nothing.

    An exception leaving the block is written to the file as the `error:` line the CLI prints (and, for
    an internal error, with its traceback, which the terminal only shows with GLM_DEBUG=1)."""
    if path is None:
        yield None
        return
    ensure_dir(path.parent)
    try:
        log = open(path, "a", encoding="utf-8", buffering=1)   # noqa: SIM115 (closed below)
    except OSError as e:
        raise os_error(e, path) from None
    if header:
        log.write(header + "\n")
    out, err = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = _Tee(out, log), _Tee(err, log)
    try:
        yield log
    except GLMError as e:
        log.write(f"error: {e}\n")
        raise
    except BaseException as e:
        if not isinstance(e, (KeyboardInterrupt, SystemExit)):
            log.write("".join(traceback.format_exception(type(e), e, e.__traceback__)))
        raise
    finally:
        sys.stdout, sys.stderr = out, err
        log.close()


_current: Optional[str] = None   # the run id of the run this process is doing (run_log)


@contextmanager
def run_log(cfg: RunConfig | dict) -> Iterator[str]:
    """The block is one run: a new run id, and for a single process (not a rank of a distributed job, whose
    launcher logs it) its output copied to output_dir/log/glm.log under a header naming the run. Nested
    calls (the CLI wraps every run mode; run_train wraps itself for callers of the API) join the outer run."""
    global _current
    if _current is not None:
        yield _current
        return
    run = as_run(cfg)
    run_id = new_run_id()
    path = None if run.use_parallel else Path(run.output_dir) / LOG_NAME
    _current = run_id
    try:
        with log_to_file(path, header_line(run_id, config_hash(run.raw), run.run_mode)):
            yield run_id
    finally:
        _current = None


def write_to_log(line: str) -> None:
    """A line for the log file only (e.g. the periodic step line while the terminal shows a progress bar)."""
    for stream in (sys.stdout, sys.stderr):
        if isinstance(stream, _Tee) and not stream.log.closed:
            stream.log.write(line + "\n")
            return


def terminal(stream: TextIO) -> TextIO:
    """The terminal stream behind a tee: a progress bar's redraws belong on the screen, not in the log."""
    return stream.stream if isinstance(stream, _Tee) else stream


# ------------------------------------------------------------------------------------------ the run
class RunLog:
    """The per-run writer of metrics.jsonl lines (stamped with run id and config hash) and, when
    tensorboard.tensorboard_dir is set, the same scalars as TensorBoard events."""

    def __init__(self, run: RunConfig, out: Path, metrics_name: str = "metrics.jsonl", main: bool = True,
                 run_id: Optional[str] = None):
        self.run_id, self.config_hash = run_id or new_run_id(), config_hash(run.raw)
        self.out = out
        self.metrics_path = out / metrics_name
        ensure_dir(out)
        try:   # appended line by line (read_jsonl skips a half-written last line)
            self._metrics = open(self.metrics_path, "a", encoding="utf-8")   # noqa: SIM115 (closed in close)
        except OSError as e:
            raise os_error(e, self.metrics_path) from None
        self._tb = None
        tb = run.tensorboard
        if main and tb.tensorboard_dir:
            from tensorboardX import SummaryWriter

            self.tensorboard_dir = Path(tb.tensorboard_dir) / self.run_id
            self._tb = SummaryWriter(logdir=str(self.tensorboard_dir), max_queue=tb.tensorboard_queue_size,
                                     flush_secs=10)

    @property
    def stamp(self) -> dict:
        return {"run_id": self.run_id, "config_hash": self.config_hash}

    def metrics(self, rec: dict, prefix: str = "train") -> dict:
        """Append one step's record; the same numbers go to TensorBoard as `prefix/field`."""
        rec = {**rec, **self.stamp}
        self._metrics.write(json.dumps(rec) + "\n")
        self._metrics.flush()
        self.scalars(rec, prefix)
        return rec

    def scalars(self, rec: dict, prefix: str) -> None:
        """TensorBoard only (e.g. eval metrics written to their own file): numeric fields of `rec`."""
        if self._tb is None or "step" not in rec:
            return
        for key, value in rec.items():
            if key not in ("step", "epoch") and isinstance(value, (int, float)) and not isinstance(value, bool):
                self._tb.add_scalar(f"{prefix}/{key}", float(value), int(rec["step"]))

    def close(self) -> None:
        self._metrics.close()
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def header_line(run_id: str, cfg_hash: str, run_mode: str) -> str:
    argv = " ".join(sys.argv) if sys.argv and sys.argv[0] else ""
    return (f"=== run {run_id} ({run_mode}, config {cfg_hash}) started {time.strftime('%Y-%m-%d %H:%M:%S')}"
            + (f": {argv}" if argv else ""))


# ------------------------------------------------------------------------------------------ curves
def read_jsonl(path: Path) -> list[dict]:
    """Records of a JSON-lines file that may still be written to: a half-written last line is skipped."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and isinstance(rec.get("step"), (int, float)):
            records.append(rec)
    return records


def by_run(records: list[dict]) -> dict[str, list[dict]]:
    """Records grouped by run id, in order of appearance. Lines written before run ids existed are
    split where the step count goes back (a new run appended to the file) and named `run 1`, `run 2`..."""
    groups: dict[str, list[dict]] = {}
    unnamed, last_step = 0, None
    for rec in records:
        rid = rec.get("run_id")
        if rid is None:
            if last_step is None or rec["step"] <= last_step:
                unnamed += 1
            last_step = rec["step"]
            rid = f"run {unnamed}"
        groups.setdefault(str(rid), []).append(rec)
    return groups


def _smooth(values: list[float]) -> list[float]:
    """Centred moving average over ~1/15 of the points: shows the trend without the lag of an EMA."""
    half = max(1, len(values) // 30)
    out = []
    for i in range(len(values)):
        window = values[max(0, i - half): i + half + 1]
        out.append(sum(window) / len(window))
    return out


def _figure(runs: dict[str, list[dict]], key: str, ylabel: str, title: str, smooth: bool):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4.5), dpi=100)
    fig.subplots_adjust(left=0.1, right=0.97, bottom=0.12, top=0.92)   # fixed: a layout engine costs 2x
    ax = fig.add_subplot()
    colors = [f"C{i % 10}" for i in range(len(runs))]
    drawn = 0
    for color, (rid, recs) in zip(colors, runs.items()):
        pts = [(r["step"], r[key]) for r in recs
               if isinstance(r.get(key), (int, float)) and math.isfinite(float(r[key]))]
        if not pts:
            continue
        steps, values = zip(*pts)
        label = rid + (f" (config {recs[0]['config_hash']})" if recs[0].get("config_hash") else "")
        marker = "o" if len(pts) < 20 else None
        if smooth and len(pts) >= 10:
            ax.plot(steps, values, color=color, alpha=0.3, linewidth=0.8)
            ax.plot(steps, _smooth(list(values)), color=color, linewidth=1.6, label=f"{label}, smoothed")
        else:
            ax.plot(steps, values, color=color, linewidth=1.4, marker=marker, markersize=3, label=label)
        drawn += 1
    if not drawn:
        return None
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, title="run id", title_fontsize=8)
    return fig


def _save_png(fig, path: Path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return write_bytes_atomic(path, buf.getvalue())


def plot_run(run_dir: str | os.PathLike) -> list[Path]:
    """Draw run_dir/metrics.jsonl (and eval_metrics.jsonl when present) as PNG curves under
    run_dir/plots/, one curve per run id; return the files written. Safe to call while a run is writing."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise GLMError(f"{run_dir}: no such run folder (expected an output_dir with metrics.jsonl)")
    train = read_jsonl(run_dir / "metrics.jsonl")
    evals = read_jsonl(run_dir / "eval_metrics.jsonl")
    if not train and not evals:
        raise GLMError(f"{run_dir}: no metrics.jsonl with any step yet (is this a training output_dir?)")
    import matplotlib

    matplotlib.use("Agg", force=False)   # files only; never needs a display
    written = []
    name = run_dir.resolve().name
    runs = by_run(train)
    for key, (stem, ylabel) in TRAIN_CURVES.items():
        fig = _figure(runs, key, ylabel, f"{ylabel} — {name}", smooth=key in ("loss", "tokens_per_s"))
        if fig is not None:
            written.append(_save_png(fig, run_dir / PLOTS / f"{stem}.png"))
    eval_runs = by_run(evals)
    metrics = sorted({k for r in evals for k, v in r.items() if k not in NOT_EVAL_METRICS
                      and isinstance(v, (int, float)) and not isinstance(v, bool)})
    for key in metrics:
        fig = _figure(eval_runs, key, f"eval {key}", f"eval {key} — {name}", smooth=False)
        if fig is not None:
            stem = "".join(c if c.isalnum() or c in "-_." else "_" for c in key)
            written.append(_save_png(fig, run_dir / PLOTS / f"eval_{stem}.png"))
    return written


def fmt(x: Any, digits: int = 4) -> str:
    """A number for a human-facing line: 4 decimals (or 4 significant digits when small/large)."""
    if not isinstance(x, (int, float)) or isinstance(x, bool):
        return str(x)
    if x == 0 or (1e-3 <= abs(x) < 1e5):
        return f"{x:.{digits}f}"
    return f"{x:.{digits}g}"
