"""Time ADGENMetric over the 1070 ADGEN dev pairs (target: <= 3 s warm on 2 cores).

References are the dev summaries; prediction i is the first half of summary i plus the second half of
summary i+1 (deterministic, partly overlapping). jieba's dictionary load is done once before timing.
Also times the reference recipe (a fresh rouge_chinese.Rouge per pair) once, and checks that both give
identical per-sample scores.

    /work/venv/bin/python bench/bench_metric.py [--runs 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from glm.metrics import ADGENMetric, _init_jieba  # noqa: E402

DEV = Path(__file__).resolve().parents[2] / "shared" / "data" / "adgen" / "dev.json"


def load_pairs() -> tuple[list[str], list[str]]:
    labels = [json.loads(line)["summary"] for line in DEV.read_text(encoding="utf-8").splitlines() if line.strip()]
    n = len(labels)
    preds = [labels[i][: len(labels[i]) // 2] + labels[(i + 1) % n][len(labels[(i + 1) % n]) // 2 :] for i in range(n)]
    return preds, labels


def reference_scores(preds: list[str], labels: list[str]) -> list[tuple]:
    """The reference ADGENMetric.update loop, verbatim."""
    import jieba
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
    from rouge_chinese import Rouge

    out = []
    for pred, label in zip(preds, labels):
        hyp, ref = " ".join(jieba.cut(pred)), " ".join(jieba.cut(label))
        s = Rouge().get_scores(hyp, ref)[0]
        bleu = sentence_bleu([list(label)], list(pred), smoothing_function=SmoothingFunction().method3)
        out.append(tuple(round(s[k]["f"] * 100, 4) for k in ("rouge-1", "rouge-2", "rouge-l")) + (round(bleu * 100, 4),))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    if not DEV.is_file():
        print(f"skip: ADGEN dev set not found at {DEV}")
        return 0
    preds, labels = load_pairs()
    _init_jieba()  # excluded from the warm timing

    times = []
    for _ in range(args.runs):
        metric = ADGENMetric()
        t0 = time.perf_counter()
        metric.update(preds, labels)
        result = metric.result()
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    print(f"ADGENMetric: {len(preds)} pairs, warm median of {args.runs}: {med:.3f} s "
          f"({len(preds) / med:.0f} pairs/s); runs: {', '.join(f'{t:.3f}' for t in times)}")
    print("result:", {k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()})

    t0 = time.perf_counter()
    ref = reference_scores(preds, labels)
    t_ref = time.perf_counter() - t0
    ours = [tuple(r[k] for k in ("rouge-1", "rouge-2", "rouge-l", "bleu-4")) for r in metric.per_sample]
    same = ours == ref
    print(f"reference recipe (Rouge() per pair, dict-DP LCS): {t_ref:.3f} s; per-sample scores identical: {same}")
    status = "PASS" if med <= 3.0 and same else "FAIL"
    print(f"{status}: target <= 3.0 s warm and identical numbers")
    return 0 if status == "PASS" else 1


if __name__ == "__main__":
    raise SystemExit(main())
