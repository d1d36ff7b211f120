"""Estimated peak training memory per device, for `--dry_run` ("will it fit?").

Counted from the parameters the model really has (built with deferred init, so nothing is allocated) and
from what glm/model/layers.py keeps for the backward, for one micro-batch of B rows x S tokens:

- weights: every parameter in its own dtype, split evenly over model_parallel x pipeline_stage;
- gradients (dtype of their parameter) and AdamW's two fp32 moments, for trainable parameters only; fp32
  accumulation buffers with gradient_accumulation_steps > 1;
- activations, per layer: the fp32 residual input of each norm (and its normalised value when the norm
  weight trains), the input of every linear whose weight or LoRA adapter trains (LoRA dropout adds its mask),
  q/k/v, the fp32 attention probabilities [B, nh, S, T] and their compute-dtype copy, the SwiGLU gate/up/silu
  [B, S, ffn] (and their product when dense_4h_to_h trains), dropout masks; plus the shared [B, 1, S, T] mask
  and one layer's backward working set (d probs and d scores, d of the MLP intermediates);
- the loss, two ways. Unchunked (main's TokenCrossEntropy before issue 14): [B*S, V] fp32 logits, log-softmax and
  softmax gradient (+ its compute-dtype copy). Chunked (glm/model/loss.py): only labelled rows (K <= B*S) in chunks of
  C = max(16, 8 Mi // V) rounded down to 16 rows: 4 fp32 [C, V] tensors at a time, the selected hidden rows and
  their gradient [K, H] fp32, and the output weight's fp32 gradient accumulator when it trains.

The sum is an upper bound of an ideal runtime (every gradient and activation alive at once); an update-phase
peak (weights, gradients, moments and fp32 clipped copies) is taken when that is larger. What it does not
know: MindSpore's own memory (on CPU ~0.6 GB, added as a line), and runtimes that keep more than the backward
needs (measured on MindSpore 2.10 CPU: a broadcasting elementwise kernel holds ~4 output-sized buffers).
1 GB here is 2^30 bytes, as in context.max_device_memory.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from typing import Optional

from glm.model.lora import lora_settings
from glm.model.loss import chunk_rows  # the loss's own rule, so the estimate cannot drift from it

GB = float(2 ** 30)
MB = float(2 ** 20)
CHUNK_LIVE = 4                   # fp32 [C, V] tensors alive per chunk: logits, log-softmax, softmax, - onehot
CPU_RUNTIME_BYTES = int(0.6 * GB)   # MindSpore's own RSS on CPU (measured: import + graphs of a 2-layer model)
# Measured (2-layer hidden-256 models, V 2048/65024, B 4/8, S 193, full and LoRA, before and after the chunked
# loss): peak RSS / (this estimate + CPU_RUNTIME_BYTES). Broadcasting elementwise kernels retain extra buffers.
CPU_MEASURED, CPU_MEASURED_RATIO = "2.10", "1.5-2.3"
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "int32": 4, "int64": 8, "bool": 1, "uint8": 1, "int8": 1}
LINEARS = ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h")
ASCEND_SIZES = (("Ascend 910A (32 GB)", 32 * GB), ("Ascend 910B (64 GB)", 64 * GB))


@dataclass(frozen=True)
class Param:
    name: str
    numel: int
    dtype: str        # "float32", "float16", ...
    trainable: bool


@dataclass
class Workload:
    """The shapes and settings of one training micro-batch (everything the estimate reads)."""

    batch: int
    seq: int                     # tokens per row (the train rows' width)
    layers: int
    hidden: int
    ffn: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    compute_bytes: int = 4
    norm_bytes: int = 4
    prefix_len: int = 0          # P-Tuning v2: keys per row are prefix + seq
    attention_dropout: float = 0.0
    hidden_dropout: float = 0.0
    lora_dropout: float = 0.0
    accumulate: int = 1
    clip: bool = False
    model_parallel: int = 1
    pipeline_stage: int = 1
    label_rows: Optional[int] = None   # K; None: every position (B * S rounded up to 16)

    @property
    def rows(self) -> int:
        return self.batch * self.seq


@dataclass(frozen=True)
class Term:
    name: str
    bytes: float
    detail: str


@dataclass
class Estimate:
    terms: list[Term]
    before: float                 # peak with the unchunked loss
    after: float                  # peak with the chunked label-only loss
    header: str = ""
    notes: list[str] = field(default_factory=list)

    def term(self, name: str) -> Term:
        return next(t for t in self.terms if t.name == name)


def _kinds(params: list[Param]) -> tuple[dict, dict, bool]:
    """Per linear kind (and output_layer): whether its base weight trains, and its LoRA adapter's lora_a size
    (rank x in) when one trains; whether the norm weights train. Layers are assumed alike."""
    trains: dict[str, bool] = {}
    lora: dict[str, int] = {}
    norms = False
    for p in params:
        m = re.search(r"(?:^|\.)(query_key_value|dense_h_to_4h|dense_4h_to_h|dense|output_layer)\.(weight|lora_a)$",
                      p.name)
        if m:
            kind, what = m.groups()
            if what == "weight":
                trains[kind] = trains.get(kind, False) or p.trainable
            elif p.trainable:
                lora[kind] = max(lora.get(kind, 0), p.numel)   # rank * in: turned into the rank below
        elif p.name.endswith("layernorm.weight") and p.trainable:
            norms = True
    return trains, lora, norms


def layer_activations(w: Workload, trains: dict, lora: dict, norms: bool) -> tuple[float, list[str]]:
    """Bytes one transformer layer keeps for the backward, and the parts (for the table's detail)."""
    b, s, h, f = w.batch, w.seq, w.hidden, w.ffn
    t = s + w.prefix_len
    cd, nd = w.compute_bytes, w.norm_bytes
    mp = w.model_parallel
    q_cols, kv_cols = w.heads * w.head_dim, w.kv_heads * w.head_dim
    in_features = {"query_key_value": h, "dense": q_cols, "dense_h_to_4h": h, "dense_4h_to_h": f}
    in_bytes = {"query_key_value": nd, "dense": cd, "dense_h_to_4h": nd, "dense_4h_to_h": cd}
    parts: dict[str, float] = {}
    # The two norms: the fp32 residual input always (dx), the normalised value when the weight trains (dw).
    parts["norms"] = 2 * b * s * h * (4 + (nd if norms else 0))
    # Linear inputs kept for dW or the LoRA adapter (LoRA dropout also keeps its mask and the dropped copy).
    kept = 0.0
    for kind in LINEARS:
        shard = 1 if kind in ("query_key_value", "dense_h_to_4h") else mp   # column- vs row-split inputs
        cols = in_features[kind] // shard
        if trains.get(kind) or lora.get(kind):
            kept += b * s * cols * cd
        if lora.get(kind):
            rank = max(1, lora[kind] // in_features[kind])
            kept += b * s * rank * cd
            if w.lora_dropout > 0:
                kept += b * s * cols * in_bytes[kind]
    parts["linear inputs"] = kept
    # Attention: q (scaled, group-folded), k, v; fp32 probabilities (softmax backward) and the compute copy.
    parts["q/k/v"] = b * (s * q_cols + 2 * t * kv_cols) * cd / mp
    probs = b * w.heads * s * t / mp
    parts[f"probs [{b},{w.heads},{s},{t}]"] = probs * (4 + (cd if cd != 4 else 0))
    if w.attention_dropout > 0:
        parts[f"probs [{b},{w.heads},{s},{t}]"] += probs * 2 * cd
    # SwiGLU: gate and up (silu and product backward), silu(gate); the product only when dense_4h_to_h trains
    # (its input is counted with the linear inputs).
    parts[f"mlp 3 x [{b},{s},{f}]"] = 3 * b * s * f * cd / mp
    if w.hidden_dropout > 0:
        parts["dropout masks"] = 2 * b * s * h * 4
    total = sum(parts.values())
    return total, [f"{k} {v / MB:,.0f}" for k, v in parts.items() if v]


def estimate(w: Workload, params: list[Param]) -> Estimate:
    """The table for one micro-batch; see the module docstring for what each term holds."""
    split = w.model_parallel * w.pipeline_stage
    trains, lora, norms = _kinds(params)
    by_dtype: dict[str, int] = {}
    for p in params:
        by_dtype[p.dtype] = by_dtype.get(p.dtype, 0) + p.numel
    weights = sum(n * DTYPE_BYTES.get(d, 4) for d, n in by_dtype.items()) / split
    trainable = [p for p in params if p.trainable]
    n_train = sum(p.numel for p in trainable)
    grads = sum(p.numel * DTYPE_BYTES.get(p.dtype, 4) for p in trainable) / split
    acc = n_train * 4 / split if w.accumulate > 1 else 0.0
    states = 2 * n_train * 4 / split
    layers_here = math.ceil(w.layers / w.pipeline_stage)
    per_layer, parts = layer_activations(w, trains, lora, norms)
    b, s, h, v, cd = w.batch, w.seq, w.hidden, w.vocab, w.compute_bytes
    t = s + w.prefix_len
    mask = b * s * t * 4
    final = b * s * h * (4 + (w.norm_bytes if norms else 0))
    acts = layers_here * per_layer + mask + final
    work = 2 * b * w.heads * s * t * 4 / w.model_parallel + 3 * b * s * w.ffn * cd / w.model_parallel
    n_rows, vs = w.rows, v / w.model_parallel
    head_trains = bool(trains.get("output_layer") or lora.get("output_layer"))
    old = 3 * n_rows * vs * 4 + (n_rows * vs * cd if cd != 4 else 0) + (n_rows * h * cd if head_trains else 0)
    k = w.label_rows if w.label_rows is not None else -(-n_rows // 16) * 16
    c = min(chunk_rows(v), k)   # a chunk never exceeds the rows there are
    new = CHUNK_LIVE * c * vs * 4 + (c * vs * cd if cd != 4 else 0) + 2 * k * h * 4
    if trains.get("output_layer"):
        new += vs * h * 4   # d_weight, accumulated in fp32 in the forward
    dtypes = ", ".join(f"{n:,} {d.replace('float', 'fp')}" for d, n in sorted(by_dtype.items(), key=lambda x: -x[1]))
    tdt = sorted({p.dtype.replace("float", "fp") for p in trainable}) or ["-"]
    terms = [
        Term("weights", weights, dtypes + (f", / {split} devices" if split > 1 else "")),
        Term("gradients", grads + acc, f"{n_train:,} trainable ({'/'.join(tdt)})"
             + (" + fp32 accumulation buffers" if acc else "")),
        Term("optimizer", states, "AdamW m, v fp32 (+ loss-scale scalars)"),
        Term("activations", acts, f"{layers_here} layers x {per_layer / MB:,.0f} MB ({', '.join(parts)}) "
             f"+ mask {mask / MB:,.0f} + final norm {final / MB:,.0f}"),
        Term("layer backward", work, "one layer's gradient temporaries (d probs, d scores, d mlp)"),
        Term("loss, unchunked", old, f"[{n_rows}, {v}] fp32 logits + log-softmax + softmax grad"
             + (" + its compute-dtype copy" if cd != 4 else "") + ": what an unchunked loss needs"),
        Term("loss, chunked", new, f"{CHUNK_LIVE} x [{c}, {v}] fp32 per chunk + hidden/d_hidden [K<={k}, {h}] fp32"
             + (" + d_weight [V, H]" if trains.get("output_layer") else "") + " (label rows only, glm/model/loss.py)"),
    ]
    common = weights + grads + acc + states
    update = common + (n_train * 4 / split if w.clip else 0.0)   # fp32 clipped gradient copies
    backward = common + acts + work
    before, after = max(backward + old, update), max(backward + new, update)
    return Estimate(terms, before, after)


def gb(x: float) -> str:
    return f"{x / GB:,.2f} GB"


def _mb_or_gb(x: float) -> str:
    return f"{x / GB:,.2f} GB" if x >= 0.1 * GB else f"{x / MB:,.1f} MB"


def host_available() -> Optional[float]:
    """MemAvailable of this host (bytes), or None when unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return float(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return float(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def parse_size(text: str) -> Optional[float]:
    """'30GB' / '512MB' (MindSpore's max_device_memory format) -> bytes; None when empty or unreadable."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)B?\s*", str(text or ""), re.IGNORECASE)
    if not m:
        return None
    return float(m.group(1)) * 1024 ** "BKMGT".index((m.group(2) or "B").upper())


def budgets(device_target: str, max_device_memory: str, cpu_available: Optional[float]) -> list[tuple[str, float]]:
    """(what, bytes) to compare the estimate with: host RAM on CPU; the configured cap, else the Ascend sizes."""
    out = []
    if device_target.upper() == "CPU" and cpu_available:
        out.append(("host RAM available (CPU run)", cpu_available))
    cap = parse_size(max_device_memory)
    if cap:
        out.append((f"context.max_device_memory {max_device_memory} (Ascend)", cap))
    elif device_target.upper() == "ASCEND":
        out.extend(ASCEND_SIZES)
    return out


def verdict(need: float, budget: float) -> str:
    return f"fits ({gb(budget - need)} spare)" if need <= budget else f"does not fit, by {gb(need - budget)}"


def render(est: Estimate, targets: list[tuple[str, float]], extra: float = 0.0, extra_what: str = "") -> str:
    """The dry run's table: one line per term, the before -> after totals and a fits line per budget."""
    lines = [est.header] if est.header else []
    width = max(len(t.name) for t in est.terms)
    for t in est.terms:
        lines.append(f"  {t.name:<{width}}  {_mb_or_gb(t.bytes):>10}  {t.detail}")
    if extra:
        lines.append(f"  {'runtime':<{width}}  {_mb_or_gb(extra):>10}  {extra_what}")
    before, after = est.before + extra, est.after + extra
    lines.append(f"  {'peak':<{width}}  unchunked loss {gb(before)} -> chunked label-only loss {gb(after)}")
    for what, size in targets:
        lines.append(f"  {what} {gb(size)}: before {verdict(before, size)}; after {verdict(after, size)}")
    if not targets:
        lines.append("  device memory unknown here: compare the totals with the device's")
    lines.extend(f"  note: {n}" for n in est.notes)
    return "\n".join(lines)


# ------------------------------------------------------------------------------- from a run config
def params_of(model) -> list[Param]:
    """The model's parameters (deferred init: shapes and dtypes only), KV caches left out."""
    out = []
    for p in model.get_parameters():
        if p.name.endswith("_cache"):
            continue
        out.append(Param(p.name, int(math.prod(p.shape)), str(p.dtype).lower(), bool(p.requires_grad)))
    return out


def _bytes_of(dtype: str, device_target: str) -> int:
    if dtype == "bfloat16" and device_target.upper() == "CPU":
        return 4   # no bf16 kernels on CPU: computed in fp32 (glm/runtime.py resolve_dtype)
    return DTYPE_BYTES.get(dtype, 4)


def workload_of(run, mcfg) -> Workload:
    """The training micro-batch of a RunConfig: runner batch x the train rows' width (max_source_length +
    max_target_length + 1, what the data pipeline pads to; seq_length without a train_dataset)."""
    data = run.train_dataset
    seq = data.max_source_length + data.max_target_length + 1 if data is not None else mcfg.seq_length
    target = run.context.device_target
    lora = lora_settings(mcfg.pet_config)
    par = run.parallel_config
    return Workload(
        batch=run.runner_config.batch_size, seq=seq, layers=mcfg.num_layers, hidden=mcfg.hidden_size,
        ffn=mcfg.ffn_hidden_size, heads=mcfg.num_attention_heads, kv_heads=mcfg.num_kv_heads,
        head_dim=mcfg.head_dim, vocab=mcfg.padded_vocab_size,
        compute_bytes=_bytes_of(mcfg.compute_dtype, target), norm_bytes=_bytes_of(mcfg.layernorm_compute_type, target),
        prefix_len=mcfg.prefix_len, attention_dropout=mcfg.attention_dropout, hidden_dropout=mcfg.hidden_dropout,
        lora_dropout=float(lora["lora_dropout"]) if lora else 0.0,
        accumulate=run.runner_config.gradient_accumulation_steps, clip=bool(run.runner_wrapper.use_clip_grad),
        model_parallel=par.model_parallel if run.use_parallel else 1,
        pipeline_stage=par.pipeline_stage if run.use_parallel else 1)


def report(run, model) -> str:
    """The dry run's memory table for a RunConfig and its deferred-init model."""
    mcfg = model.config
    w = workload_of(run, mcfg)
    est = estimate(w, params_of(model))
    target = run.context.device_target
    par = run.parallel_config
    layout = (f"data parallel {par.data_parallel}, model parallel {w.model_parallel}, pipeline {w.pipeline_stage}"
              if run.use_parallel else "one device")
    est.header = (f"estimated peak training memory per device: micro-batch {w.batch} x {w.seq} tokens, "
                  f"compute {mcfg.compute_dtype}, {layout}")
    rc = run.recompute_config
    if rc.recompute or rc.select_recompute:
        est.notes.append("recompute_config asks for recomputation, which is not applied here: activations are "
                         "counted in full")
    if run.use_parallel and w.model_parallel * w.pipeline_stage > 1:
        est.notes.append("model/pipeline parallel: assumed to split weights and activations evenly")
    if run.use_parallel and (run.parallel.enable_parallel_optimizer or par.optimizer_shard):
        est.notes.append("enable_parallel_optimizer is not applied here: optimizer states are not sharded")
    extra = CPU_RUNTIME_BYTES if target.upper() == "CPU" else 0.0
    if extra:
        est.notes.append(f"on CPU MindSpore {CPU_MEASURED} keeps more than the backward needs: measured peak RSS "
                         f"of small runs was {CPU_MEASURED_RATIO} x this estimate")
    return render(est, budgets(target, run.context.max_device_memory, host_available()), extra,
                  "MindSpore itself on CPU (measured)")
