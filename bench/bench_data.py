"""Benchmark ADGEN preprocessing: read + tokenize + pack the train file into numpy samples.

Default: the 5,000 ADGEN train lines with the real ChatGLM2 tokenizer, train phase v2, lengths 64/128 (the YAML's).
Reports warm samples/s (median of --repeats runs after one warm-up) for the whole `load_adgen` call and for the
preprocessing alone (without JSON reading), plus one epoch through the MindSpore pipeline (median of --repeats epochs).

    python bench/bench_data.py
    python bench/bench_data.py --data ../shared/data/adgen/train.json \
        --vocab ../shared/data/tokenizers/chatglm2/tokenizer.model --version 2 --src 64 --tgt 128

--conversations: ChatGLM3 conversation data (format: conversations) with the real ChatGLM3 tokenizer. The
5,000 conversations are built from the ADGEN lines (a third single requests, a third two rounds, a third tool
calls with a system turn carrying a tools list, the call's JSON arguments and an observation), written to a
temporary file; timed against a plain per-message loop of ChatGLM3's finetune_demo `process_batch` on the same
sentencepiece model (the peer), alternating, median of --repeats.

    python bench/bench_data.py --conversations --src 512 --tgt 511
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from glm.data import load_adgen, load_data, preprocess_train, read_jsonl  # noqa: E402
from glm.tokenizer import load_tokenizer  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def timed(fn, repeats: int) -> float:
    fn()  # warm-up (page cache, sentencepiece internals)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


TOOLS = [{"name": "search_item", "description": "按商品属性查询库存",
          "parameters": {"type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]}}]


def conversation_lines(adgen: str, n: int) -> list[str]:
    rows = [json.loads(line) for line in Path(adgen).read_text(encoding="utf-8").splitlines() if line.strip()]
    out = []
    for i in range(n):
        a, b = rows[i % len(rows)], rows[(i + 1) % len(rows)]
        if i % 3 == 0:
            row = {"conversations": [{"role": "user", "content": a["content"]},
                                     {"role": "assistant", "content": a["summary"]}]}
        elif i % 3 == 1:
            row = {"conversations": [{"role": "user", "content": a["content"]},
                                     {"role": "assistant", "content": a["summary"]},
                                     {"role": "user", "content": b["content"]},
                                     {"role": "assistant", "content": b["summary"]}]}
        else:
            row = {"tools": TOOLS, "conversations": [
                {"role": "system", "content": "你是一个导购助手。"},
                {"role": "user", "content": a["content"]},
                {"role": "assistant", "metadata": "search_item",
                 "content": json.dumps({"query": a["content"][:24]}, ensure_ascii=False)},
                {"role": "observation", "content": json.dumps({"库存": i % 50, "标题": b["content"][:30]},
                                                              ensure_ascii=False)},
                {"role": "assistant", "content": a["summary"]}]}
        out.append(json.dumps(row, ensure_ascii=False))
    return out


def peer_process_batch(path: str, sp, max_len: int) -> list[tuple[list[int], list[int]]]:
    """ChatGLM3 finetune_demo's process_batch, written out per message on raw sentencepiece (the peer)."""
    role = {"system": 64794, "user": 64795, "assistant": 64796, "observation": 64797}
    out = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        ids, mask = [64790, 64792], [False, False]
        for m in row["conversations"]:
            content = m["content"]
            if m["role"] == "system" and row.get("tools"):
                content += "\n" + json.dumps(row["tools"], indent=4, ensure_ascii=False)
            part = [role[m["role"]]] + sp.encode(f"{m.get('metadata', '')}\n") + sp.encode(content)
            ids += part
            mask += [m["role"] == "assistant"] * len(part)
        ids.append(2)
        mask = [False, *mask]
        out.append((ids[:max_len], [t if k else -100 for t, k in zip(ids, mask)][:max_len]))
    return out


def bench_conversations(args) -> None:
    import sentencepiece as spm

    vocab = args.vocab if "chatglm3" in args.vocab else str(SHARED / "tokenizers" / "chatglm3" / "tokenizer.model")
    tok = load_tokenizer("ChatGLM3Tokenizer", vocab)
    sp = spm.SentencePieceProcessor(model_file=vocab)
    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "conversations.json")
        Path(path).write_text("\n".join(conversation_lines(args.data, args.n)) + "\n", encoding="utf-8")

        def ours():
            load_data(path, tok, phase="train", version=3, max_source_length=args.src, max_target_length=args.tgt,
                      fmt="conversations")

        def peer():
            peer_process_batch(path, sp, args.src + args.tgt + 1)

        def adgen():  # the same 5,000 ADGEN lines as plain pairs: a yardstick for the machine's load
            load_adgen(args.data, tok, phase="train", version=2, max_source_length=64, max_target_length=128)

        ours(), peer(), adgen()  # warm-up
        t_ours, t_peer, t_adgen = [], [], []
        for _ in range(args.repeats):  # alternating, so all see the same machine load
            for fn, times in ((ours, t_ours), (peer, t_peer), (adgen, t_adgen)):
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
    mo, mp, ma = statistics.median(t_ours), statistics.median(t_peer), statistics.median(t_adgen)
    print(f"{args.n} conversations (1/3 single, 1/3 two rounds, 1/3 tool calls), train, L = {args.src + args.tgt + 1}")
    print(f"ours  load_data(format=conversations): {mo * 1e3:.0f} ms -> {args.n / mo:,.0f} samples/s "
          f"(runs: {', '.join(f'{args.n / t:,.0f}' for t in t_ours)})")
    print(f"peer  process_batch per message:       {mp * 1e3:.0f} ms -> {args.n / mp:,.0f} samples/s "
          f"(runs: {', '.join(f'{args.n / t:,.0f}' for t in t_peer)})")
    print(f"ADGEN load_adgen v2 64/128 on the source lines: {ma * 1e3:.0f} ms -> {args.n / ma:,.0f} samples/s")
    print(f"ratio peer/ours time: {mp / mo:.2f}x; ours/ADGEN time: {mo / ma:.2f}x (median of {args.repeats}, "
          f"alternating; os.getloadavg() {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)")


def _run_epoch(data, epoch: int) -> int:
    return sum(1 for _ in data.for_epoch(epoch).create_tuple_iterator(output_numpy=True, num_epochs=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=str(SHARED / "adgen" / "train.json"))
    ap.add_argument("--vocab", default=str(SHARED / "tokenizers" / "chatglm2" / "tokenizer.model"))
    ap.add_argument("--tokenizer", default="ChatGLM2Tokenizer")
    ap.add_argument("--version", type=int, default=2)
    ap.add_argument("--src", type=int, default=64)
    ap.add_argument("--tgt", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--conversations", action="store_true", help="benchmark ChatGLM3 conversation data instead")
    ap.add_argument("--n", type=int, default=5000, help="--conversations: number of conversations")
    args = ap.parse_args()
    if args.conversations:
        bench_conversations(args)
        return

    tok = load_tokenizer(args.tokenizer, args.vocab)
    records, _ = read_jsonl(args.data)
    n = len(records)
    t_all = timed(lambda: load_adgen(args.data, tok, phase="train", version=args.version,
                                     max_source_length=args.src, max_target_length=args.tgt), args.repeats)
    t_pre = timed(lambda: preprocess_train(tok, records, args.src, args.tgt, args.version), args.repeats)
    print(f"{n} samples, train v{args.version}, max_source {args.src}, max_target {args.tgt}")
    print(f"read + preprocess: {t_all * 1e3:.0f} ms  -> {n / t_all:,.0f} samples/s (median of {args.repeats}, warm)")
    print(f"preprocess only:   {t_pre * 1e3:.0f} ms  -> {n / t_pre:,.0f} samples/s")

    from glm.data import build_dataset

    # One epoch through GeneratorDataset + batch, per worker count (the YAMLs say 8; build_dataset clamps it to
    # os.cpu_count()). The source only indexes numpy arrays under the GIL, so extra threads mostly contend.
    for workers in (1, 8):
        section = {"data_loader": {"dataset_dir": args.data, "phase": "train", "version": args.version,
                                   "shuffle": True},
                   "tokenizer": {"type": args.tokenizer, "vocab_file": args.vocab},
                   "max_source_length": args.src, "max_target_length": args.tgt, "num_parallel_workers": workers}
        data = build_dataset(section, batch_size=args.batch_size)
        epochs = iter(range(1, 100))  # a fresh permutation per timed epoch, as in training
        dt = timed(lambda d=data, e=epochs: _run_epoch(d, next(e)), args.repeats)
        print(f"MindSpore pipeline, num_parallel_workers {workers} -> {data.num_parallel_workers}: one epoch of "
              f"{data.num_batches} batches of {args.batch_size} in {dt * 1e3:.0f} ms "
              f"-> {data.num_batches * args.batch_size / dt:,.0f} samples/s")

if __name__ == "__main__":
    main()
