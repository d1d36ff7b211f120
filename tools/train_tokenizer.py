"""Train the tiny SentencePiece model shipped as data/sample/tokenizer.model.

It is trained only on the project's own sample text (data/sample/*.json), with ChatGLM's layout: unk 0, bos 1,
eos 2, no pad piece, add_dummy_prefix, identity normalisation (so decode(encode(x)) == x). byte_fallback makes
every character encodable. The GLM special tokens ([gMASK], sop, <|user|>, ...) are not SentencePiece pieces:
glm/tokenizer.py appends them after sp.vocab_size(), exactly as with the real model.

Regenerate (deterministic, single-threaded training):
    python tools/make_sample_data.py --out data/sample --train 300 --dev 40 --seed 1234
    python tools/train_tokenizer.py --data data/sample/train.json data/sample/dev.json \
        --out data/sample/tokenizer.model --vocab-size 1000
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
from pathlib import Path

import sentencepiece as spm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # a checkout, not installed

from glm.io import write_bytes_atomic  # noqa: E402


def sample_sentences(files: list[str]) -> list[str]:
    out = []
    for f in files:
        for line in Path(f).read_text(encoding="utf-8").splitlines():
            if line.strip():
                row = json.loads(line)
                out += [row["content"], row["summary"]]
    # The chat-template words and digits, so "[Round 1]\n\n问：…\n\n答：" costs few tokens.
    out += ["[Round 1]", "问：", "答：", "0123456789"] * 50
    return out


def train(files: list[str], out: str, vocab_size: int) -> None:
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sample_sentences(files)), model_writer=model,
        vocab_size=vocab_size, model_type="bpe", character_coverage=1.0, byte_fallback=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, add_dummy_prefix=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, split_digits=True, num_threads=1, minloglevel=2,
        hard_vocab_limit=False)
    write_bytes_atomic(out, model.getvalue())
    sp = spm.SentencePieceProcessor(model_file=out)
    print(f"wrote {out}: {sp.vocab_size()} pieces")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", nargs="+", default=["data/sample/train.json", "data/sample/dev.json"])
    ap.add_argument("--out", default="data/sample/tokenizer.model")
    ap.add_argument("--vocab-size", type=int, default=1000)
    args = ap.parse_args()
    train(args.data, args.out, args.vocab_size)


if __name__ == "__main__":
    main()
