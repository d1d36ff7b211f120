"""The dry run's peak-memory estimate (glm/memory.py): the terms equal the formulas written out by hand from
glm/model/layers.py, the parameters come from the deferred-init model, and the 6B LoRA dry run answers
"will it fit" quickly and without allocating the model."""

from __future__ import annotations

import math
import re
import time

import pytest
from cli_utils import TINY2_LORA, run_glm

from glm.memory import GB, Param, Workload, budgets, chunk_rows, estimate, parse_size, verdict

# A tiny layout: B 2, S 5, H 8, ffn 12, 2 query heads of 4 sharing 1 kv head, V 40, 3 layers.
B, S, H, F, NH, KV, HD, V, L = 2, 5, 8, 12, 2, 1, 4, 40, 3
QKV = (NH + 2 * KV) * HD


def _params(full: bool, lora_rank: int = 0) -> list[Param]:
    """The parameter list of a GLM with this layout: fp16 linears and embedding, fp32 norms (as the model
    builds them); `full` trains everything, else only LoRA adapters on query_key_value train."""
    out = [Param("transformer.embedding.embedding_table", V * H, "float16", full)]
    for i in range(L):
        pre = f"transformer.encoder.layers.{i}."
        out += [Param(pre + "input_layernorm.weight", H, "float32", full),
                Param(pre + "self_attention.query_key_value.weight", QKV * H, "float16", full),
                Param(pre + "self_attention.query_key_value.bias", QKV, "float16", full),
                Param(pre + "self_attention.dense.weight", H * NH * HD, "float16", full),
                Param(pre + "post_attention_layernorm.weight", H, "float32", full),
                Param(pre + "mlp.dense_h_to_4h.weight", 2 * F * H, "float16", full),
                Param(pre + "mlp.dense_4h_to_h.weight", H * F, "float16", full)]
        if lora_rank:
            out += [Param(pre + "self_attention.query_key_value.lora_a", lora_rank * H, "float32", True),
                    Param(pre + "self_attention.query_key_value.lora_b", QKV * lora_rank, "float32", True)]
    out += [Param("transformer.encoder.final_layernorm.weight", H, "float32", full),
            Param("transformer.output_layer.weight", V * H, "float16", full)]
    return out


def _workload(**kw) -> Workload:
    return Workload(batch=B, seq=S, layers=L, hidden=H, ffn=F, heads=NH, kv_heads=KV, head_dim=HD, vocab=V,
                    compute_bytes=2, norm_bytes=4, **kw)


def test_chunk_rows_is_specs_rule():
    assert chunk_rows(65024) == 128           # 8 Mi / 65024 = 129 -> 128
    assert chunk_rows(2048) == 4096           # 8 Mi / 2048
    assert chunk_rows(10 ** 7) == 16          # never below 16 rows
    assert all(chunk_rows(v) % 16 == 0 for v in (1000, 4096, 65024, 130528))


def test_full_finetune_terms_equal_the_hand_formula():
    params = _params(full=True)
    est = estimate(_workload(), params)
    n = B * S
    weights = sum(p.numel * (2 if p.dtype == "float16" else 4) for p in params)
    assert est.term("weights").bytes == weights
    assert est.term("gradients").bytes == weights                      # every parameter trains, same dtypes
    assert est.term("optimizer").bytes == 2 * 4 * sum(p.numel for p in params)
    # per layer (layers.py): norm inputs fp32 + normalised values (norm weights train); the inputs of the
    # 4 trained linears in fp16; q, k, v; probs fp32 + fp16; SwiGLU gate, up, silu.
    layer = (2 * B * S * H * (4 + 4) + B * S * (H + NH * HD + H + F) * 2 + B * (S * NH * HD + 2 * S * KV * HD) * 2
             + B * NH * S * S * (4 + 2) + 3 * B * S * F * 2)
    mask, final = B * S * S * 4, B * S * H * (4 + 4)
    assert est.term("activations").bytes == L * layer + mask + final
    work = 2 * B * NH * S * S * 4 + 3 * B * S * F * 2
    assert est.term("layer backward").bytes == work
    # Unchunked: fp32 logits, log-softmax, softmax grad, the fp16 grad copy, the output layer's fp16 input (dW).
    old = 3 * n * V * 4 + n * V * 2 + n * H * 2
    assert est.term("loss, unchunked").bytes == old
    k = 16                                   # 10 rows rounded up to 16; a chunk is at most those 16 rows
    new = 4 * k * V * 4 + k * V * 2 + 2 * k * H * 4 + V * H * 4      # + the fp32 d_weight accumulator
    assert est.term("loss, chunked").bytes == new
    common = 2 * weights + 8 * sum(p.numel for p in params) + L * layer + mask + final + work
    assert est.before == common + old and est.after == common + new


def test_lora_counts_only_what_the_adapters_need():
    params = _params(full=False, lora_rank=2)
    est = estimate(_workload(lora_dropout=0.1, accumulate=2), params)
    trainable = [p for p in params if p.trainable]
    n_train = sum(p.numel for p in trainable)
    assert n_train == L * 2 * (H + QKV)
    # fp32 adapter gradients + fp32 accumulation buffers (gradient_accumulation_steps 2)
    assert est.term("gradients").bytes == n_train * 4 + n_train * 4
    assert est.term("optimizer").bytes == 2 * 4 * n_train
    # frozen norms keep only their fp32 input; qkv keeps its fp16 input, x A [.., r] and the dropout mask (fp32
    # norm output); frozen dense / dense_4h_to_h keep no input.
    layer = (2 * B * S * H * 4 + B * S * H * 2 + B * S * 2 * 2 + B * S * H * 4
             + B * (S * NH * HD + 2 * S * KV * HD) * 2 + B * NH * S * S * (4 + 2) + 3 * B * S * F * 2)
    assert est.term("activations").bytes == L * layer + B * S * S * 4 + B * S * H * 4
    n = B * S
    assert est.term("loss, unchunked").bytes == 3 * n * V * 4 + n * V * 2        # no dW of a frozen head
    assert est.term("loss, chunked").bytes == 4 * 16 * V * 4 + 16 * V * 2 + 2 * 16 * H * 4


def test_update_phase_wins_when_clipping_a_large_trainable_set():
    """Clipping makes fp32 copies of every gradient after the activations are gone: with no activations to
    speak of (1 token, 1 label row) the peak is that update phase."""
    w = Workload(batch=1, seq=1, layers=L, hidden=H, ffn=F, heads=NH, kv_heads=KV, head_dim=HD, vocab=V, clip=True,
                 label_rows=1)
    params = _params(full=True)
    est = estimate(w, params)
    n_train = sum(p.numel for p in params)
    update = est.term("weights").bytes + est.term("gradients").bytes + est.term("optimizer").bytes + 4 * n_train
    assert est.after == update


def test_model_and_pipeline_parallel_split_the_weights():
    params = _params(full=True)
    one = estimate(_workload(), params)
    split = estimate(_workload(model_parallel=2, pipeline_stage=2), params)
    assert split.term("weights").bytes == one.term("weights").bytes / 4
    assert split.term("optimizer").bytes == one.term("optimizer").bytes / 4


def test_sizes_budgets_and_verdicts():
    assert parse_size("30GB") == 30 * GB and parse_size("512MB") == 512 * 2 ** 20 and parse_size("") is None
    assert parse_size("lots") is None
    assert budgets("Ascend", "30GB", None) == [("context.max_device_memory 30GB (Ascend)", 30 * GB)]
    assert [b for _, b in budgets("Ascend", "", None)] == [32 * GB, 64 * GB]
    assert budgets("CPU", "", 8 * GB) == [("host RAM available (CPU run)", 8 * GB)]
    assert budgets("GPU", "", None) == []
    assert verdict(10 * GB, 12 * GB) == "fits (2.00 GB spare)"
    assert verdict(13.5 * GB, 12 * GB) == "does not fit, by 1.50 GB"


def test_parameters_come_from_the_deferred_model():
    """params_of reads the deferred-init model: LoRA adapters are the trainable fp32 parameters."""
    from glm.config import load_config
    from glm.dryrun import build_model_deferred
    from glm.memory import params_of
    from glm.model.glm import count_parameters

    model, _ = build_model_deferred(load_config(TINY2_LORA))
    params = params_of(model)
    assert sum(p.numel for p in params) == count_parameters(model)
    trainable = [p for p in params if p.trainable]
    assert sum(p.numel for p in trainable) == count_parameters(model, True)
    assert trainable and all(p.name.endswith((".lora_a", ".lora_b")) and p.dtype == "float32" for p in trainable)


def _gb(line: str, label: str) -> float:
    return float(re.search(label + r" ([0-9.,]+) GB", line).group(1).replace(",", ""))


def test_6b_lora_dry_run_answers_will_it_fit():
    """configs/glm2/run_glm2_6b_lora.yaml on this CPU box: the table, before -> after, and a verdict against
    the configured Ascend cap (30GB) and the host's RAM, from shapes alone (6.2 B parameters, no allocation)."""
    t0 = time.monotonic()
    proc = run_glm("--config", "configs/glm2/run_glm2_6b_lora.yaml", "--run_mode", "finetune", "--dry_run",
                   "--device_target", "CPU", "--load_checkpoint", "random",
                   "train_dataset.data_loader.dataset_dir=data/sample/train.json",
                   "train_dataset.tokenizer.vocab_file=data/sample/tokenizer.model", timeout=120)
    elapsed = time.monotonic() - t0
    out = proc.stdout
    assert "estimated peak training memory per device: micro-batch 8 x 192 tokens" in out
    for name in ("weights", "gradients", "optimizer", "activations", "loss, unchunked", "loss, chunked"):
        assert re.search(rf"^  {re.escape(name)} +[0-9.,]+ [MG]B", out, re.M), name
    assert "[1536, 65024] fp32 logits" in out and "4 x [128, 65024] fp32" in out
    peak = next(line for line in out.splitlines() if line.strip().startswith("peak"))
    before, after = _gb(peak, "unchunked loss"), _gb(peak, "chunked label-only loss")
    weights = float(re.search(r"^  weights +([0-9.]+) GB", out, re.M).group(1))
    assert math.isclose(weights, 6_243_350_528 * 2 / GB + 2_183_168 * 4 / GB, abs_tol=0.01)
    # the unchunked loss of 8 x 192 rows x 65024 fp32 is ~1.3 GB; chunking leaves ~0.2 GB
    assert 1.0 < before - after < 1.3
    cap = next(line for line in out.splitlines() if "context.max_device_memory 30GB (Ascend)" in line)
    assert re.search(r"before (fits|does not fit)", cap) and re.search(r"after (fits|does not fit)", cap)
    assert "host RAM available (CPU run)" in out
    assert "dry run OK" in out
    assert elapsed < 60, elapsed


@pytest.mark.parametrize("mode", ["eval"])
def test_memory_table_is_for_training_only(mode):
    proc = run_glm("--config", TINY2_LORA, "--run_mode", mode, "--dry_run", "--load_checkpoint", "random",
                   check=False)
    assert "estimated peak training memory" not in proc.stdout
