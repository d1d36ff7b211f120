"""Eval throughput of the tiny model through the CLI (issue 5's "eval throughput of the tiny model").

    python bench/bench_eval.py [--steps 30] [--samples 40] [--repeats 3] [--random] [--write]

Makes its own checkpoint: `run_glm.py --run_mode finetune` on configs/glm2/run_glm2_tiny.yaml for `--steps`
steps from random init (a model that has learnt to stop, so answers have realistic lengths), or, with
`--random`, evaluates `load_checkpoint: random` (answers usually run to max_decode_length). Then runs
`run_glm.py --run_mode eval` on the shipped data/sample/dev.json `--repeats` times and reads
samples_per_s / new_tokens_per_s from each run's metrics.json. Those cover the whole generation loop of
run_eval (prompt batching, prefill + KV-cache decode, decoding, scoring, writing predictions.jsonl),
*including* the graph compilation of the first batch; the process wall time (Python and MindSpore start-up,
model build, data) is printed beside them. `--write` updates bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from results import write_section

REPO = Path(__file__).resolve().parents[1]
CONFIG = "configs/glm2/run_glm2_tiny.yaml"
DEV = "data/sample/dev.json"
SECTION = "## Tiny-model eval throughput (bench/bench_eval.py)"


def run_glm(*args: str) -> float:
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, str(REPO / "run_glm.py"), "--config", CONFIG, *args], cwd=REPO,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"run_glm.py {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    return time.perf_counter() - t


def make_checkpoint(out: Path, steps: int) -> str:
    run_glm("--run_mode", "finetune", "--load_checkpoint", "random", "--output_dir", str(out / "finetune"),
            "--max_steps", str(steps), "callbacks.CheckpointMonitor.save_checkpoint_steps=100000")
    return str(out / "finetune" / "checkpoint_network" / "rank_0" / "glm2-tiny_rank_0-network.ckpt")


def run_eval(out: Path, ckpt: str, samples: int, batch_size: int | None) -> dict:
    extra = ["--batch_size", str(batch_size)] if batch_size else []
    wall = run_glm("--run_mode", "eval", "--load_checkpoint", ckpt, "--output_dir", str(out),
                   "--eval_dataset_dir", DEV, f"eval_dataset.max_eval_samples={samples}", *extra)
    metrics = json.loads((out / "metrics.json").read_text())
    preds = [json.loads(line) for line in (out / "predictions.jsonl").read_text(encoding="utf-8").splitlines()]
    return {**metrics, "wall_s": wall, "mean_new_tokens": statistics.mean(p["new_tokens"] for p in preds)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=30, help="finetune steps for the checkpoint")
    parser.add_argument("--random", action="store_true", help="evaluate random weights (no finetune)")
    parser.add_argument("--samples", type=int, default=40, help="max_eval_samples (the dev file has 40)")
    parser.add_argument("--batch_size", type=int, default=None, help="eval batch (default: the config's, 4)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--write", action="store_true", help="update bench/RESULTS.md")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ckpt = "random" if args.random else make_checkpoint(tmp, args.steps)
        runs = [run_eval(tmp / f"eval{i}", ckpt, args.samples, args.batch_size) for i in range(args.repeats)]
    sps = statistics.median(r["samples_per_s"] for r in runs)
    tps = statistics.median(r["new_tokens_per_s"] for r in runs)
    wall = statistics.median(r["wall_s"] for r in runs)
    r0 = runs[0]
    load = open("/proc/loadavg").read().split()[0]
    weights = "random weights" if args.random else f"a {args.steps}-step finetune"
    batch = args.batch_size or 4
    lines = [f"Command: `python bench/bench_eval.py --steps {args.steps} --samples {args.samples} --repeats "
             f"{args.repeats}{' --random' if args.random else ''}` ({time.strftime('%Y-%m-%d')}, load average "
             f"{load} at the end)", "",
             f"Tiny GLM2 ({CONFIG}), {weights}, {r0['samples']} samples of {DEV}, batch {batch}, greedy, KV cache; "
             f"{r0['mean_new_tokens']:.1f} new tokens per sample, {r0['empty_predictions']} empty.", "",
             "| what | median of runs |", "|---|---|",
             f"| samples/s (run_eval's generation loop, first-batch compile included) | {sps:.2f} |",
             f"| new tokens/s (same) | {tps:,.0f} |",
             f"| whole `run_glm.py --run_mode eval` process, wall clock | {wall:.1f} s |", "",
             "Runs: " + ", ".join(f"{r['samples_per_s']:.2f} samples/s" for r in runs) + "."]
    print("\n".join(lines))
    if args.write:
        write_section(SECTION, "\n".join(lines))


if __name__ == "__main__":
    main()
