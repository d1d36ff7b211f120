"""The tiny fine-tune through the CLI vs the raw training step on the same shapes (issue 4's speed check).

    python bench/bench_cli.py [--steps 150] [--write]

Runs `run_glm.py --run_mode finetune` on configs/glm2/run_glm2_tiny.yaml and reads its steady-state
tokens/s (wall clock per step, including data, logging and checkpointing; steps 1-2 compile) and peak
RSS from train_summary.json; then times `TrainStep.run` alone on random batches of the same shape
(batch 4 x seq 128) in a fresh process. Prints the ratio; `--write` updates bench/RESULTS.md.
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
SECTION = "## CLI fine-tune vs raw step (bench/bench_cli.py)"

RAW = r"""
import json, statistics, sys, time, resource
import numpy as np
from glm.build import build_model, model_config
from glm.config import load_config
from glm.optim import build_optimizer
from glm.settings import resolve
from glm.runtime import ms, setup_context
from glm.train_step import TrainStep
setup_context("CPU", 0)
ms.set_seed(0)
cfg = resolve(load_config(sys.argv[1]))
model, _ = build_model(cfg)
model.set_train(True)
opt = build_optimizer(cfg.optimizer, model.trainable_params())
step = TrainStep(model, opt, 1.0, None, 1)
rs = np.random.RandomState(0)
B, S, V = 4, model.config.seq_length, 1000
times = []
for i in range(int(sys.argv[2])):
    ids = rs.randint(3, V, (B, S)).astype(np.int32)
    labels = np.where(np.arange(S) >= 40, np.roll(ids, -1, 1), -100).astype(np.int32)
    t = time.perf_counter(); step.run([(ids, labels)], [1.0], 1e-4, i + 1); times.append(time.perf_counter() - t)
med = statistics.median(times[2:])
print(json.dumps({"tokens_per_s": B * S / med, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def run_cli(steps: int) -> dict:
    with tempfile.TemporaryDirectory() as out:
        subprocess.run([sys.executable, str(REPO / "run_glm.py"), "--config", CONFIG, "--run_mode", "finetune",
                        "--output_dir", out, "--max_steps", str(steps)], cwd=REPO, check=True,
                       capture_output=True, text=True)
        return json.loads((Path(out) / "train_summary.json").read_text())


def run_raw(steps: int) -> dict:
    r = subprocess.run([sys.executable, "-c", RAW, CONFIG, str(steps)], cwd=REPO, check=True,
                       capture_output=True, text=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()
    cli, raw = [], []
    for _ in range(args.repeats):        # interleaved, so both see the same machine load
        cli.append(run_cli(args.steps))
        raw.append(run_raw(args.steps))
    cli_tps = statistics.median(c["steady_tokens_per_s"] for c in cli)
    raw_tps = statistics.median(r["tokens_per_s"] for r in raw)
    rss = max(c["peak_rss_mb"] for c in cli)
    load = open("/proc/loadavg").read().split()[0]
    lines = [f"Command: `python bench/bench_cli.py --steps {args.steps} --repeats {args.repeats}` "
             f"({time.strftime('%Y-%m-%d')}, load average {load} at the end)", "",
             "| what | tokens/s (median) |", "|---|---|",
             f"| CLI tiny finetune, steady state (data + step + logging + checkpoints) | {cli_tps:,.0f} |",
             f"| raw `TrainStep.run`, same shapes (batch 4 x seq 128) | {raw_tps:,.0f} |",
             f"| ratio CLI / raw | {cli_tps / raw_tps:.3f} |", "",
             f"CLI peak RSS: {rss:,.0f} MB (limit 1,536 MB).", "",
             "Runs (CLI / raw, interleaved): " + ", ".join(f"{c['steady_tokens_per_s']:,.0f} / {r['tokens_per_s']:,.0f}"
                                                         for c, r in zip(cli, raw)) + ". Single runs vary by "
             "about +-10% on this machine, hence the median of several."]
    print("\n".join(lines))
    if args.write:
        write_section(SECTION, "\n".join(lines))


if __name__ == "__main__":
    main()
