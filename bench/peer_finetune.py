"""The transformers peer of bench/bench_finetune.py: the user's job written as an HF user would write it.

    python bench/peer_finetune.py train --data train.json --vocab tokenizer.model --out DIR [--batch 8 ...]
    python bench/peer_finetune.py eval  --data dev.json   --vocab tokenizer.model --out DIR [--batch 8 ...]

train: GlmForCausalLM (the ChatGLM3 architecture in transformers) from random init, fp32, one epoch;
dynamic padding to the longest row of each batch with an attention mask, HF-style unshifted labels with
-100 (the model shifts them), torch.optim.AdamW with no decay on 1-D parameters (as HF Trainer), grad
clipping, a LambdaLR with the launcher's warmup + polynomial schedule; at the end the model is saved with
`save_pretrained` and the optimizer/scheduler state with torch.save (what an HF Trainer checkpoint holds).
eval: greedy `generate` with batched LEFT padding, exactly `max_length - prompt width` new tokens per
batch (min_new_tokens = max_new_tokens, so eos never stops it early), decode, ADGEN ROUGE/BLEU.

Deliberately shared with the launcher: the token ids and labels come from glm.data / glm.tokenizer (no
MindSpore is imported), the sample order is the launcher's seeded permutation, and the eval scores come
from glm.metrics, so only the trainer / generator differs. Prints one `RESULT {json}` line.
"""

from __future__ import annotations

import time

T_START = time.perf_counter()

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from transformers import GlmConfig, GlmForCausalLM  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from glm.data import load_adgen  # noqa: E402
from glm.tokenizer import load_tokenizer  # noqa: E402

T_IMPORTS = time.perf_counter()
IGNORE = -100


def build_model(args: argparse.Namespace, vocab: int, eos: int) -> GlmForCausalLM:
    """GlmConfig with the launcher's ChatGLM shapes (see /work/shared/research/peer_transformers_glm.md)."""
    torch.manual_seed(args.seed)
    cfg = GlmConfig(num_hidden_layers=args.layers, hidden_size=args.hidden, num_attention_heads=args.heads,
                    num_key_value_heads=args.kv_heads, head_dim=args.hidden // args.heads,
                    intermediate_size=args.ffn, vocab_size=vocab, rms_norm_eps=1e-5, attention_bias=True,
                    max_position_embeddings=2048, pad_token_id=0, eos_token_id=eos, bos_token_id=None,
                    tie_word_embeddings=False,
                    rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5})
    return GlmForCausalLM(cfg).float()


def lr_lambda(warmup: int, total: int):
    """The launcher's schedule (glm/optim.py LRSchedule, polynomial power 1, lr_end 0) as a multiplier."""
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, 1.0 - min(1.0, (step - warmup) / max(1, total - warmup)))
    return f


def train(args: argparse.Namespace) -> dict:
    tok = load_tokenizer("ChatGLM3Tokenizer", args.vocab)
    _, samples, _ = load_adgen(args.data, tok, phase="train", version=3, max_source_length=args.max_source,
                               max_target_length=args.max_target)
    ids, shifted = samples["input_ids"], samples["labels"]
    # The launcher's labels are pre-shifted (labels[t] = ids[t + 1]); transformers shifts inside the loss.
    labels = np.full_like(shifted, IGNORE)
    labels[:, 1:] = shifted[:, :-1]
    # A row's real length: its last label sits at length - 2 of the pre-shifted layout (the eos).
    last = shifted.shape[1] - 1 - np.argmax((shifted != IGNORE)[:, ::-1], axis=1)
    lengths = last + 2
    order = np.random.default_rng(args.seed).permutation(len(ids))   # = glm.dataset.epoch_order(epoch 0)
    steps = len(ids) // args.batch                                     # drop_last, as drop_remainder
    t_data = time.perf_counter()

    model = build_model(args, args.vocab_size, tok.eos_id)
    model.train()
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95), eps=1e-8)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(args.warmup, steps))
    t_model = time.perf_counter()

    losses, target_tokens, padded_tokens = [], 0, 0
    for step in range(steps):
        sel = order[step * args.batch:(step + 1) * args.batch]
        width = int(lengths[sel].max())                                  # dynamic padding (DataCollatorForSeq2Seq)
        x = torch.from_numpy(ids[sel, :width].astype(np.int64))
        y = torch.from_numpy(labels[sel, :width].astype(np.int64))
        mask = torch.from_numpy((np.arange(width)[None, :] < lengths[sel][:, None]).astype(np.int64))
        loss = model(input_ids=x, attention_mask=mask, labels=y).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(round(loss.item(), 6))
        target_tokens += int((y[:, 1:] != IGNORE).sum())
        padded_tokens += x.numel()
    t_train = time.perf_counter()

    out = Path(args.out) / f"checkpoint-{steps}"
    model.save_pretrained(out)
    torch.save({"optimizer": opt.state_dict(), "scheduler": sched.state_dict()}, out / "optimizer.pt")
    t_save = time.perf_counter()
    return {"steps": steps, "losses": losses, "target_tokens": target_tokens, "padded_tokens": padded_tokens,
            "phases_s": {"imports": T_IMPORTS - T_START, "data": t_data - T_IMPORTS, "model+optimizer": t_model - t_data,
                         "train_steps": t_train - t_model, "save": t_save - t_train}}


def evaluate(args: argparse.Namespace) -> dict:
    from glm.metrics import ADGENMetric

    tok = load_tokenizer("ChatGLM3Tokenizer", args.vocab)
    records, samples, _ = load_adgen(args.data, tok, phase="eval", version=3, max_source_length=args.max_source,
                                     max_target_length=args.max_target)
    n = min(args.samples, len(records))
    prompts = [[int(t) for t in row if t != tok.pad_id] for row in samples["input_ids"][:n]]
    t_data = time.perf_counter()
    model = build_model(args, args.vocab_size, tok.eos_id)
    model.eval()
    t_model = time.perf_counter()
    metric, new_tokens = ADGENMetric(), 0
    t0 = time.perf_counter()
    for start in range(0, n, args.batch):
        chunk = prompts[start:start + args.batch]
        width = max(map(len, chunk))
        x = torch.zeros((len(chunk), width), dtype=torch.long)   # left padding with pad id 0
        mask = torch.zeros_like(x)
        for i, p in enumerate(chunk):
            x[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        new = args.max_length - width        # the launcher's budget for one batch: max_decode_length - longest
        with torch.inference_mode():
            y = model.generate(input_ids=x, attention_mask=mask, do_sample=False, use_cache=True,
                               max_new_tokens=new, min_new_tokens=new, pad_token_id=tok.pad_id,
                               eos_token_id=tok.stop_token_ids)
        gen = y[:, width:]
        assert gen.shape[1] == new, (gen.shape, new)
        new_tokens += gen.numel()
        recs = records[start:start + len(chunk)]
        # random weights may pick the head's padding rows (>= the tokenizer's vocabulary), which do not decode
        texts = [tok.decode([t for t in g.tolist() if t < tok.vocab_size]) for g in gen]
        metric.update(texts, [r.answer for r in recs], [r.line for r in recs])
    seconds = time.perf_counter() - t0
    result = metric.result()
    return {"samples": n, "samples_per_s": n / seconds, "new_tokens": new_tokens, "gen_loop_s": seconds,
            "rouge-1": result["rouge-1"],
            "phases_s": {"imports": T_IMPORTS - T_START, "data": t_data - T_IMPORTS, "model": t_model - t_data,
                         "generate+score": seconds}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("mode", choices=["train", "eval"])
    ap.add_argument("--data", required=True)
    ap.add_argument("--vocab", required=True, help="the ChatGLM3 tokenizer.model")
    ap.add_argument("--out", required=True)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv_heads", type=int, default=2)
    ap.add_argument("--ffn", type=int, default=688)
    ap.add_argument("--vocab_size", type=int, default=65024)
    ap.add_argument("--max_source", type=int, default=64)
    ap.add_argument("--max_target", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--weight_decay", type=float, default=0.01)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--samples", type=int, default=200, help="eval: prompts")
    ap.add_argument("--max_length", type=int, default=192, help="eval: prompt width + new tokens")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    res = train(args) if args.mode == "train" else evaluate(args)
    print("RESULT " + json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
