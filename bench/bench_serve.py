#!/usr/bin/env python
"""Serving throughput and time to first token, batching on vs off, at 1 / 4 / 8 concurrent clients.

    python bench/bench_serve.py [--requests 16] [--repeats 3] [--max_tokens 32] [--write]

Two servers run the same tiny random-weight GLM2 (`run_glm.py --run_mode serve`): one batches up to 8
requests per generation (serve.batch_size=8), the other decodes one request at a time (batch_size=1).
For each concurrency level, `--requests` streaming greedy requests are sent by that many client threads;
the two servers are measured alternately, `--repeats` times, and the medians are compared (the CPU is
shared with other jobs, so only the paired ratios mean much). Every answer is checked to be identical
between the two servers.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
CONFIG = "configs/glm2/run_glm2_tiny.yaml"
PROMPTS = [json.loads(line)["content"] for line in (REPO / "data/sample/dev.json").read_text("utf-8").splitlines()]


def start(batch: int) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, str(REPO / "run_glm.py"), "--config", CONFIG, "--run_mode", "serve",
                             "--load_checkpoint", "random", "--port", "0", f"serve.batch_size={batch}",
                             "serve.model_name=tiny", "--output_dir", f"/tmp/bench_serve_{batch}_{os.getpid()}"], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    line = proc.stdout.readline()
    m = re.search(r"(http://127\.0\.0\.1:\d+)", line)
    if not m:
        proc.kill()
        raise SystemExit(f"server did not start: {line!r}")
    return proc, m.group(1)


def one(url: str, prompt: str, max_tokens: int) -> tuple[float, str]:
    """(seconds to the first content chunk, the whole text) of one streamed request."""
    t0 = time.perf_counter()
    first, parts = None, []
    body = {"model": "tiny", "stream": True, "temperature": 0, "max_tokens": max_tokens,
            "messages": [{"role": "user", "content": prompt}]}
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            delta = json.loads(line[6:])["choices"][0]["delta"].get("content")
            if delta:
                first = first or time.perf_counter() - t0
                parts.append(delta)
    return first or time.perf_counter() - t0, "".join(parts)


def round_(url: str, clients: int, requests: int, max_tokens: int) -> tuple[float, float, list[str]]:
    """(requests/s, median TTFT, answers) for `requests` requests over `clients` concurrent clients."""
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(requests)]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(lambda p: one(url, p, max_tokens), prompts))
    wall = time.perf_counter() - t0
    return requests / wall, statistics.median(r[0] for r in results), [r[1] for r in results]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max_tokens", type=int, default=32)
    ap.add_argument("--write", action="store_true", help="write the table into bench/RESULTS.md")
    args = ap.parse_args()
    servers = {"on": start(8), "off": start(1)}
    rows = []
    try:
        for _, url in servers.values():   # warm the HTTP path and the bucket shapes once
            round_(url, 8, 8, args.max_tokens)
        for clients in (1, 4, 8):
            runs: dict[str, list] = {"on": [], "off": []}
            answers: dict[str, list] = {}
            for rep in range(args.repeats):
                order = ("on", "off") if rep % 2 == 0 else ("off", "on")
                for name in order:
                    rps, ttft, texts = round_(servers[name][1], clients, args.requests, args.max_tokens)
                    runs[name].append((rps, ttft))
                    answers.setdefault(name, texts)
            assert answers["on"] == answers["off"], "batching changed the answers"
            med = {k: (statistics.median(r[0] for r in v), statistics.median(r[1] for r in v)) for k, v in runs.items()}
            ratios = [a[0] / b[0] for a, b in zip(runs["on"], runs["off"])]
            rows.append((clients, med["on"], med["off"], statistics.median(ratios), runs))
            print(f"{clients} clients: batching on {med['on'][0]:.2f} req/s (TTFT {med['on'][1] * 1000:.0f} ms), "
                  f"off {med['off'][0]:.2f} req/s (TTFT {med['off'][1] * 1000:.0f} ms), "
                  f"paired ratio {statistics.median(ratios):.2f}x", flush=True)
    finally:
        for proc, _ in servers.values():
            proc.send_signal(signal.SIGTERM)
        for proc, _ in servers.values():
            proc.wait(60)
    if args.write:
        from results import write_section

        load = open("/proc/loadavg").read().split()[0]
        lines = ["| clients | batching on: req/s | TTFT | batching off: req/s | TTFT | throughput on/off (median of paired) |",
                 "|---|---|---|---|---|---|"]
        for clients, on, off, ratio, _ in rows:
            lines.append(f"| {clients} | {on[0]:.2f} | {on[1] * 1000:.0f} ms | {off[0]:.2f} | {off[1] * 1000:.0f} ms "
                         f"| **{ratio:.2f}x** |")
        body = (f"`python bench/bench_serve.py --requests {args.requests} --repeats {args.repeats} "
                f"--max_tokens {args.max_tokens} --write`\n\n"
                f"Tiny GLM2 (random weights, greedy, {args.max_tokens} new tokens per request, streamed), "
                "`--run_mode serve` with serve.batch_size=8 (on) vs 1 (off), measured alternately; "
                f"{args.requests} requests per round, {args.repeats} rounds per cell, medians. Both servers gave "
                f"identical answers. Load average at the end: {load} (2 shared cores: absolute numbers are noisy, "
                "the paired ratio is the result).\n\n" + "\n".join(lines))
        write_section("## Serving: batching on vs off (bench/bench_serve.py)", body)


if __name__ == "__main__":
    main()
