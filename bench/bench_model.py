"""Benchmark the GLM model on CPU against the transformers `GlmForCausalLM` peer (same shapes, fp32).

Cases, each run in a fresh subprocess (so peak RSS is per case and runs do not share caches):
  train        forward + backward + clip + AdamW (`TrainStep`, one graph), batch 4 x seq 256, 13 steps,
               median of steps 4-13; tokens/s = 4*256 / median step time
  gen_cache    32-token prompt, 128 new tokens, batch 1, greedy, KV cache; one warm-up call, median of 5
  gen_nocache  the same with full recomputation of the sequence at every step
  kv256        ours only, tiny: 32-token prompt, 256 new tokens, cached vs recompute (issue target >= 8x)

The peer is measured exactly like /work/shared/research/peer_transformers_glm.md section 4.1
(torch.set_num_threads(2), SDPA, `model.generate(do_sample=False)`, an 8-token warm-up). Ours warms up
with a full-length call instead, because graph mode compiles each prompt bucket on first use.
Ours and the peer alternate within every repeat (the order flips each repeat), so both see the same
machine load; the table gives the median over repeats of each run's own median, and the load average.

    /work/venv/bin/python bench/bench_model.py                      # tiny + small, all cases, 3 repeats
    /work/venv/bin/python bench/bench_model.py --configs tiny --cases train gen_cache --repeats 1
    /work/venv/bin/python bench/bench_model.py --write              # also update bench/RESULTS.md
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from results import RESULTS, write_section

ROOT = Path(__file__).resolve().parents[1]
SECTION = "## Model (bench/bench_model.py)"

SHAPES = {
    "tiny": dict(layers=2, hidden=256, heads=8, kv=2, ffn=688, vocab=4096),
    "small": dict(layers=4, hidden=512, heads=8, kv=2, ffn=1376, vocab=16384),
}
TRAIN_B, TRAIN_S, TRAIN_STEPS, TRAIN_SKIP = 4, 256, 13, 3
PROMPT, NEW_TOKENS, GEN_CALLS = 32, 128, 5
CASES = ["train", "gen_cache", "gen_nocache", "kv256"]


def loadavg() -> str:
    return open("/proc/loadavg").read().split()[0]


def peak_rss_mb() -> float:
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


# ---------------------------------------------------------------------------------------------- workers
def run_ours(shape: dict, case: str, new_tokens: int) -> dict:
    import numpy as np

    sys.path.insert(0, str(ROOT))
    from glm.runtime import ms, setup_context

    setup_context("CPU", 0)
    ms.set_seed(0)
    from glm.generate import GenerationConfig, Generator
    from glm.model.config import GLMConfig
    from glm.model.glm import GLMForCausalLM, count_parameters
    from glm.optim import AdamW
    from glm.train_step import TrainStep

    cache = case == "gen_cache"
    seq_length = TRAIN_S if case == "train" else PROMPT + new_tokens
    cfg = GLMConfig(num_layers=shape["layers"], hidden_size=shape["hidden"], num_attention_heads=shape["heads"],
                    kv_channels=shape["hidden"] // shape["heads"], multi_query_group_num=shape["kv"],
                    ffn_hidden_size=shape["ffn"], padded_vocab_size=shape["vocab"], seq_length=seq_length,
                    use_past=cache, batch_size=1)
    model = GLMForCausalLM(cfg)
    out = {"params": count_parameters(model)}
    rng = np.random.default_rng(0)
    if case == "train":
        step = TrainStep(model, AdamW(model.trainable_params(), weight_decay=0.01), max_grad_norm=1.0,
                         loss_scale=None, accumulate=1)
        times = []
        for i in range(TRAIN_STEPS):
            ids = rng.integers(0, shape["vocab"], (TRAIN_B, TRAIN_S)).astype(np.int32)
            t = time.perf_counter()
            loss, _, _ = step.run([(ids, ids)], [1.0], 1e-4, i + 1)
            dt = time.perf_counter() - t
            if i == 0:
                out["first_step_s"] = round(dt, 2)
            if i >= TRAIN_SKIP:
                times.append(dt)
        out["final_loss"] = round(loss, 3)
        return out | {"times": times}
    gen = Generator(model, use_cache=cache)
    prompt = rng.integers(1, shape["vocab"] - 1, PROMPT).tolist()
    gcfg = GenerationConfig(max_new_tokens=new_tokens, eos_token_id=[-1])
    t = time.perf_counter()
    gen.generate([prompt], gcfg)  # warm-up: compiles the prefill/decode (or every bucket) graph(s)
    out["warmup_s"] = round(time.perf_counter() - t, 2)
    times = []
    for _ in range(GEN_CALLS):
        t = time.perf_counter()
        y = gen.generate([prompt], gcfg)
        times.append(time.perf_counter() - t)
    assert len(y[0]) == new_tokens, len(y[0])
    return out | {"times": times}


def run_peer(shape: dict, case: str, new_tokens: int) -> dict:
    import torch
    from transformers import GlmConfig, GlmForCausalLM

    torch.set_num_threads(2)
    torch.manual_seed(0)
    cfg = GlmConfig(num_hidden_layers=shape["layers"], hidden_size=shape["hidden"],
                    num_attention_heads=shape["heads"], num_key_value_heads=shape["kv"],
                    intermediate_size=shape["ffn"], vocab_size=shape["vocab"],
                    head_dim=shape["hidden"] // shape["heads"], rms_norm_eps=1e-5, attention_bias=True,
                    max_position_embeddings=2048, pad_token_id=0, eos_token_id=shape["vocab"] - 1,
                    bos_token_id=None,
                    rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5})
    model = GlmForCausalLM(cfg).float()
    out = {"params": sum(p.numel() for p in model.parameters())}
    if case == "train":
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        times = []
        for i in range(TRAIN_STEPS):
            x = torch.randint(0, shape["vocab"], (TRAIN_B, TRAIN_S))
            t = time.perf_counter()
            loss = model(input_ids=x, labels=x).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            dt = time.perf_counter() - t
            if i >= TRAIN_SKIP:
                times.append(dt)
        out["final_loss"] = round(loss.item(), 3)
        return out | {"times": times}
    model.eval()
    x = torch.randint(1, shape["vocab"] - 1, (1, PROMPT))
    kw = dict(do_sample=False, use_cache=case == "gen_cache", max_new_tokens=new_tokens,
              min_new_tokens=new_tokens, pad_token_id=0)
    times = []
    with torch.no_grad():
        model.generate(x, **{**kw, "max_new_tokens": 8, "min_new_tokens": 8})  # warm-up
        for _ in range(GEN_CALLS):
            t = time.perf_counter()
            y = model.generate(x, **kw)
            times.append(time.perf_counter() - t)
    assert y.shape[1] == PROMPT + new_tokens, y.shape
    return out | {"times": times}


def worker(impl: str, config: str, case: str, new_tokens: int) -> None:
    """Run one case in this process and print one JSON line."""
    rss0 = peak_rss_mb()
    fn = run_ours if impl == "ours" else run_peer
    out = fn(SHAPES[config], case, new_tokens)
    times = out.pop("times")
    med = statistics.median(times)
    work = TRAIN_B * TRAIN_S if case == "train" else new_tokens
    out.update(impl=impl, config=config, case=case, median_s=round(med, 5), min_s=round(min(times), 5),
               rate=round(work / med, 1), rss_start_MB=rss0, peak_rss_MB=peak_rss_mb(), loadavg=loadavg())
    print("RESULT " + json.dumps(out), flush=True)


# ---------------------------------------------------------------------------------------------- driver
def spawn(impl: str, config: str, case: str, new_tokens: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", impl, config, case, str(new_tokens)]
    env = dict(os.environ, GLOG_v="3", PYTHONWARNINGS="ignore")
    load0 = loadavg()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            res = json.loads(line[7:])
            res["loadavg"] = f"{load0}-{res['loadavg']}"
            return res
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
    return {"impl": impl, "config": config, "case": case, "error": " | ".join(tail)}


def fmt_rate(runs: list[dict]) -> tuple[float | None, str]:
    ok = [r["rate"] for r in runs if "rate" in r]
    if not ok:
        return None, "error: " + runs[0].get("error", "?")[:120] if runs else "-"
    med = statistics.median(ok)
    spread = f" ({min(ok):,.0f}-{max(ok):,.0f})" if len(ok) > 1 else ""
    return med, f"{med:,.0f}{spread}"


def rss(runs: list[dict]) -> str:
    vals = [r["peak_rss_MB"] for r in runs if "peak_rss_MB" in r]
    return f"{statistics.median(vals):,.0f}" if vals else "-"


def build_table(results: dict, configs: list[str], cases: list[str], repeats: int) -> list[str]:
    units = {"train": "tokens/s", "gen_cache": "new tok/s", "gen_nocache": "new tok/s"}
    lines = ["| config | case | ours | peer (transformers) | ours / peer (median of per-repeat ratios) | "
             "peak RSS MB ours / peer | load avg |",
             "|---|---|---|---|---|---|---|"]
    for config in configs:
        for case in [c for c in cases if c != "kv256"]:
            ours, peer = results.get(("ours", config, case), []), results.get(("peer", config, case), [])
            o, o_txt = fmt_rate(ours)
            p, p_txt = fmt_rate(peer) if peer else (None, "-")
            ratio = f"**{o / p:.2f}x**" if o and p else "-"
            paired = [a["rate"] / b["rate"] for a, b in zip(ours, peer) if "rate" in a and "rate" in b]
            if len(paired) > 1:  # same repeat = adjacent in time, so the load is about the same
                ratio += f" (paired {statistics.median(paired):.2f}x, {min(paired):.2f}-{max(paired):.2f})"
            loads = ", ".join(r["loadavg"] for r in ours + peer if "loadavg" in r)
            lines.append(f"| {config} | {case} ({units[case]}) | {o_txt} | {p_txt} | {ratio} | "
                         f"{rss(ours)} / {rss(peer)} | {loads} |")
    lines.append("")
    for config in configs:
        if "gen_cache" in cases and "gen_nocache" in cases:
            c, _ = fmt_rate(results.get(("ours", config, "gen_cache"), []))
            n, _ = fmt_rate(results.get(("ours", config, "gen_nocache"), []))
            if c and n:
                lines.append(f"- KV-cache speed-up, ours, {config}, {NEW_TOKENS} new tokens: **{c / n:.1f}x** "
                             f"(peer: {_peer_speedup(results, config)})")
    if "kv256" in cases:
        c, c_txt = fmt_rate(results.get(("ours", "tiny", "kv256_cache"), []))
        n, n_txt = fmt_rate(results.get(("ours", "tiny", "kv256_nocache"), []))
        if c and n:
            lines.append(f"- KV-cache speed-up, ours, tiny, prompt {PROMPT} + 256 new tokens (seq_length 288): "
                         f"cached {c_txt} vs recompute {n_txt} new tok/s = **{c / n:.1f}x** (target >= 8x)")
    lines.append(f"- Values: median over {repeats} repeat(s) of each run's median (range in brackets); the paired "
                 "ratio divides ours by the peer run next to it in the same repeat, which cancels slow load "
                 "changes; load avg = 1-min load at the start-end of each run, ours first then peer.")
    return lines


def _peer_speedup(results: dict, config: str) -> str:
    c, _ = fmt_rate(results.get(("peer", config, "gen_cache"), []))
    n, _ = fmt_rate(results.get(("peer", config, "gen_nocache"), []))
    return f"{c / n:.1f}x" if c and n else "-"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--configs", nargs="+", default=["tiny", "small"], choices=list(SHAPES))
    ap.add_argument("--cases", nargs="+", default=CASES, choices=CASES)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-peer", action="store_true", help="skip the transformers peer")
    ap.add_argument("--write", action="store_true", help=f"update '{SECTION}' in bench/RESULTS.md")
    ap.add_argument("--worker", nargs=4, metavar=("IMPL", "CONFIG", "CASE", "NEW"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        impl, config, case, new = args.worker
        worker(impl, config, case, int(new))
        return

    try:
        import transformers  # noqa: F401

        impls = ["ours"] if args.no_peer else ["ours", "peer"]
    except ImportError:
        print("transformers is not importable: measuring ours only")
        impls = ["ours"]
    jobs = []
    for config in args.configs:
        for case in args.cases:
            if case == "kv256":
                jobs += [("ours", "tiny", "gen_cache", 256, "kv256_cache"),
                         ("ours", "tiny", "gen_nocache", 256, "kv256_nocache")]
            else:
                jobs += [(impl, config, case, NEW_TOKENS, case) for impl in impls]
    jobs = list(dict.fromkeys(jobs))  # kv256 is listed once even with several configs
    start = datetime.datetime.now(datetime.timezone.utc)
    load_start = open("/proc/loadavg").read().strip()
    results: dict = {}
    for rep in range(args.repeats):
        order = jobs if rep % 2 == 0 else _flip_pairs(jobs)
        for impl, config, case, new, key in order:
            res = spawn(impl, config, case, new)
            results.setdefault((impl, config, key), []).append(res)
            shown = {k: res[k] for k in ("rate", "median_s", "peak_rss_MB", "loadavg", "error") if k in res}
            print(f"[{rep + 1}/{args.repeats}] {impl:4} {config:5} {key:14} {shown}", flush=True)
    lines = build_table(results, args.configs, args.cases, args.repeats)
    print("\n".join(lines))
    if args.write:
        argv = " ".join(sys.argv[1:])
        cmd = f"/work/venv/bin/python bench/bench_model.py {argv}".strip()
        header = [f"Command: `{cmd}`", "",
                  f"Date: {start:%Y-%m-%d %H:%M} UTC; /proc/loadavg at start: `{load_start}`, at end: "
                  f"`{open('/proc/loadavg').read().strip()}` (2-core machine shared with other jobs).",
                  "Ours: MindSpore 2.10 graph mode, fp32; peer: transformers GlmForCausalLM, torch CPU, "
                  "2 threads, SDPA. Each case is a fresh process; ours and the peer alternate.", ""]
        write_section(SECTION, "\n".join(header + lines))
        print(f"updated {RESULTS}")


def _flip_pairs(jobs: list) -> list:
    """Reverse ours/peer order of each case so neither side always runs first."""
    flipped = []
    i = 0
    while i < len(jobs):
        if i + 1 < len(jobs) and jobs[i][1:] == jobs[i + 1][1:] and jobs[i][0] != jobs[i + 1][0]:
            flipped += [jobs[i + 1], jobs[i]]
            i += 2
        else:
            flipped.append(jobs[i])
            i += 1
    return flipped


if __name__ == "__main__":
    main()
