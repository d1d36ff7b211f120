"""Benchmark ADGEN preprocessing: read + tokenize + pack the train file into numpy samples.

Default: the 5,000 ADGEN train lines with the real ChatGLM2 tokenizer, train phase v2, lengths 64/128 (the YAML's).
Reports warm samples/s (median of --repeats runs after one warm-up) for the whole `load_adgen` call and for the
preprocessing alone (without JSON reading), plus one epoch through the MindSpore pipeline (median of --repeats epochs).

    python bench/bench_data.py
    python bench/bench_data.py --data ../shared/data/adgen/train.json \
        --vocab ../shared/data/tokenizers/chatglm2/tokenizer.model --version 2 --src 64 --tgt 128
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from glm.data import load_adgen, preprocess_train, read_jsonl  # noqa: E402
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
    args = ap.parse_args()

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
