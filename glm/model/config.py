"""GLM model hyper-parameters, named as in MindFormers' `model.model_config` YAML section."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

from glm import GLMError
from glm.validate import INERT, NONE, NOTICE, REFUSED, key

# P-Tuning v2 settings live here, free of MindSpore, so that reading a config never imports it;
# the prefix encoder itself is glm/model/ptuning.py.
PET_TYPE = "ptuning2"


@dataclass(frozen=True)
class PTuningSettings:
    """`model.model_config.pet_config` with `pet_type: ptuning2`; the defaults are MindFormers' Ptuning2Config."""

    pre_seq_len: int = 128          # prefix rows per layer (key/value cache slots before the prompt)
    prefix_projection: bool = False  # reparameterise the prefix through a 2-layer tanh MLP
    projection_dim: int = 128       # that MLP's hidden width (used only with prefix_projection)
    dropout_prob: float = 0.01      # dropout on the prefix keys/values, training only

    def to_dict(self) -> dict:
        return {"pet_type": PET_TYPE, **dataclasses.asdict(self)}


DEFAULTS = PTuningSettings()


def ptuning_settings(pet_config: Optional[dict], where: str = "model.model_config.pet_config"
                     ) -> Optional[PTuningSettings]:
    """The P-Tuning v2 settings of a pet_config mapping, or None when it is absent or another method."""
    if not pet_config or pet_config.get("pet_type") != PET_TYPE:
        return None
    known = {f.name for f in dataclasses.fields(PTuningSettings)}
    values = {k: v for k, v in pet_config.items() if k in known and v is not None}
    s = PTuningSettings(**values)
    for name in ("pre_seq_len", "projection_dim"):
        v = getattr(s, name)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise GLMError(f"{where}.{name}: expected a positive integer, got {v!r}")
    if not 0.0 <= float(s.dropout_prob) < 1.0:
        raise GLMError(f"{where}.dropout_prob: expected a probability in [0, 1), got {s.dropout_prob!r}")
    return s


@dataclass
class GLMConfig:
    """ChatGLM2-6B and ChatGLM3-6B share this architecture; only the tokenizer differs."""

    # Architecture (MindFormers' ChatGLM2Config; GLM3 uses it too).
    num_layers: int = key(28, "transformer layers", min=1)
    padded_vocab_size: int = key(65024, "embedding/output rows (>= the tokenizer's vocabulary)", min=1)
    hidden_size: int = key(4096, "model width (= num_attention_heads x kv_channels)", min=1)
    ffn_hidden_size: int = key(13696, "SwiGLU inner width", min=1)
    kv_channels: int = key(128, "head dimension (rotary on half of it)", min=1)
    num_attention_heads: int = key(32, "query heads", min=1)
    multi_query_attention: bool = key(True, "grouped key/value heads (GQA)")
    multi_query_group_num: int = key(2, "key/value heads with multi_query_attention", min=1)
    seq_length: int = key(2048, "static sequence length: training samples and the KV cache", min=1)
    layernorm_epsilon: float = key(1e-5, "RMSNorm epsilon", min=0)
    rmsnorm: bool = key(True, "RMSNorm (the only norm of ChatGLM2/3)")
    post_layer_norm: bool = key(True, "final norm before the output layer (ChatGLM2/3 have it)", status=REFUSED,
                                note="a model without the final norm is not implemented")
    apply_residual_connection_post_layernorm: bool = key(False, "must be False for ChatGLM2/3")
    add_bias_linear: bool = key(False, "biases on the dense layers")
    add_qkv_bias: bool = key(True, "bias on the query/key/value projection")
    rope_ratio: float = key(1.0, "RoPE base = 10000 x rope_ratio", min=0)
    hidden_dropout: float = key(0.0, "dropout before the residual adds", min=0)
    attention_dropout: float = key(0.0, "dropout on attention probabilities", min=0)
    param_init_type: str = key("float32", "parameter dtype: float32, float16, bfloat16 (bf16 runs as fp32 on CPU)")
    compute_dtype: str = key("float32", "matmul dtype: float32, float16, bfloat16")
    layernorm_compute_type: str = key("float32", "norm and residual dtype")
    initializer_range: float = key(0.02, "std of the random initialisation", min=0, ours=True)
    apply_query_key_layer_scaling: bool = key(
        True, "True: scores scaled by 1/sqrt(head_dim) in fp32", status=REFUSED,
        note="False (no 1/sqrt(d) scaling at all in MindFormers) is not implemented")
    attention_softmax_in_fp32: bool = key(True, "softmax in float32", status=NOTICE,
                                          note="the softmax is always float32 here")
    fp32_residual_connection: bool = key(False, "stored only by MindFormers", status=INERT)
    bias_dropout_fusion: bool = key(True, "kernel fusion switch, stored only by MindFormers", status=INERT)
    softmax_compute_type: str = key("float32", "not read by MindFormers' GLM2", status=INERT)
    embedding_type: str = key("float32", "embedding table dtype", status=NOTICE, off=("float32",),
                              note="the embedding follows param_init_type here")
    quantization_bit: int = key(0, "weight quantisation bits (0: none)", min=0, status=REFUSED,
                                note="quantised models are not implemented")
    # P-Tuning v2 is configured in pet_config (pet_type: ptuning2), as MindFormers does; these two
    # model-level keys may only repeat its values (see `prefix_len`, `_check_prefix_keys`).
    pre_seq_len: Optional[int] = key(None, "P-Tuning v2 prefix length: only with pet_config.pet_type ptuning2 "
                                     "and equal to pet_config.pre_seq_len", kind=(int, NONE), min=0)
    prefix_projection: bool = key(False, "P-Tuning v2 prefix MLP: only with pet_config.pet_type ptuning2 and "
                                  "as pet_config.prefix_projection")
    # Inference and export.
    use_past: bool = key(False, "KV cache: generation always uses it here, training never")
    is_dynamic: bool = key(False, "export: a dynamic prompt-length dimension in the prefill graph")
    batch_size: int = key(1, "KV-cache/export batch (predict uses the prompt count)", min=1)
    use_flash_attention: bool = key(False, "FlashAttention kernel", status=NOTICE, note="no kernel on CPU")
    use_prompt_flash_attention: bool = key(False, "prefill FlashAttention kernel", status=NOTICE)
    use_incre_flash_attention: bool = key(False, "decode FlashAttention kernel", status=NOTICE)
    use_paged_attention: bool = key(False, "paged KV cache", status=NOTICE)
    block_size: int = key(16, "paged attention block", min=1, status=INERT)
    num_blocks: int = key(224, "paged attention blocks", min=1, status=INERT)
    use_kvcache_op: bool = key(False, "fused KV-cache update op", status=NOTICE)
    is_flexible_shape: bool = key(False, "flexible export shapes", status=NOTICE)
    is_sample_acceleration: bool = key(False, "sampling on device", status=NOTICE)
    no_recompute_layers: Optional[list] = key(None, "layers exempt from recompute", kind=(list, NONE),
                                              status=NOTICE)
    mask_type: Optional[str] = key(None, "derived in MindFormers", kind=(str, NONE), status=INERT)
    gmask_token_id: Optional[int] = key(None, "the tokenizer defines it", kind=(int, NONE), status=INERT)
    bos_token_id: Optional[int] = key(None, "the tokenizer defines it", kind=(int, NONE), status=INERT)
    vocab_size: Optional[int] = key(None, "derived: padded_vocab_size is what counts", kind=(int, NONE),
                                    status=INERT)
    eos_token_id: Any = key(2, "end-of-sequence id(s); the tokenizer's stop tokens are added", kind=(int, list))
    pad_token_id: int = key(0, "padding id: attention ignores it, labels of it are -100", min=0)
    # Generation defaults (MindFormers keeps them in the model section).
    max_decode_length: int = key(256, "total length (prompt + answer) of generation; capped at seq_length",
                                 min=1)
    repetition_penalty: float = key(1.0, "CTRL-style penalty on tokens already present (1: none)", min=0)
    top_k: int = key(1, "sample among the k likeliest tokens (1 = greedy)", min=0)
    top_p: float = key(1.0, "nucleus sampling mass", min=0)
    do_sample: bool = key(False, "sample (True) or greedy (False); top_k 1 is greedy either way")
    temperature: float = key(1.0, "softmax temperature when sampling", min=0, ours=True)
    checkpoint_name_or_path: str = key("", "MindFormers replaces it by load_checkpoint; set load_checkpoint",
                                       status=INERT)
    type: str = key("ChatGLM2Config", "config class name", status=INERT)
    pet_config: Optional[dict] = key(None, "parameter-efficient fine-tuning (LoRA; see PetConfig)",
                                     kind=(dict, NONE))
    extra: dict = field(default_factory=dict, repr=False)

    # ------------------------------------------------------------------ derived shapes
    @property
    def head_dim(self) -> int:
        return self.kv_channels

    @property
    def num_kv_heads(self) -> int:
        return self.multi_query_group_num if self.multi_query_attention else self.num_attention_heads

    @property
    def qkv_size(self) -> int:
        return (self.num_attention_heads + 2 * self.num_kv_heads) * self.head_dim

    @property
    def ptuning(self):
        """The P-Tuning v2 settings (PTuningSettings), or None."""
        return ptuning_settings(self.pet_config)

    @property
    def prefix_len(self) -> int:
        """Key/value prefix rows per layer (P-Tuning v2's pre_seq_len), 0 without P-Tuning."""
        p = self.ptuning
        return p.pre_seq_len if p else 0

    @classmethod
    def from_dict(cls, d: dict, where: str = "model.model_config") -> GLMConfig:
        """Build from a YAML section; unknown keys are an error naming the closest known key."""
        import difflib

        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        kwargs = {}
        for name, value in (d or {}).items():
            if name not in known:
                close = difflib.get_close_matches(name, sorted(known), n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise GLMError(f"{where}: unknown key {name!r}{hint}")
            kwargs[name] = value
        cfg = cls(**kwargs)
        cfg.validate(where)
        return cfg

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("extra")
        return d

    def validate(self, where: str = "model.model_config") -> None:
        ints = ["num_layers", "padded_vocab_size", "hidden_size", "ffn_hidden_size", "kv_channels",
                "num_attention_heads", "multi_query_group_num", "seq_length", "batch_size"]
        for k in ints:
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise GLMError(f"{where}.{k}: expected a positive integer, got {v!r}")
        for k in ["layernorm_epsilon", "rope_ratio", "hidden_dropout", "attention_dropout"]:
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise GLMError(f"{where}.{k}: expected a number, got {v!r}")
        for k in ["hidden_dropout", "attention_dropout"]:
            if not 0.0 <= getattr(self, k) < 1.0:
                raise GLMError(f"{where}.{k}: expected a probability in [0, 1), got {getattr(self, k)!r}")
        for k in ["param_init_type", "compute_dtype", "layernorm_compute_type"]:
            if getattr(self, k) not in ("float32", "float16", "bfloat16"):
                raise GLMError(f"{where}.{k}: expected float32, float16 or bfloat16, got {getattr(self, k)!r}")
        if self.num_attention_heads * self.kv_channels != self.hidden_size:
            raise GLMError(
                f"{where}: num_attention_heads ({self.num_attention_heads}) x kv_channels ({self.kv_channels}) "
                f"must equal hidden_size ({self.hidden_size})")
        if self.num_attention_heads % self.num_kv_heads:
            raise GLMError(
                f"{where}: multi_query_group_num ({self.multi_query_group_num}) must divide "
                f"num_attention_heads ({self.num_attention_heads})")
        if self.kv_channels % 4:
            raise GLMError(f"{where}.kv_channels: must be a multiple of 4 (rotary pairs on half the head), "
                           f"got {self.kv_channels}")
        if not self.rmsnorm:
            raise GLMError(f"{where}.rmsnorm: only RMSNorm (True) is supported by ChatGLM2/3")
        if self.apply_residual_connection_post_layernorm:
            raise GLMError(f"{where}.apply_residual_connection_post_layernorm: ChatGLM2/3 use False")
        self._check_prefix_keys(where)
        if not 0 <= self.pad_token_id < self.padded_vocab_size:
            raise GLMError(f"{where}.pad_token_id: {self.pad_token_id} is outside the vocabulary "
                           f"(padded_vocab_size {self.padded_vocab_size})")

    def _check_prefix_keys(self, where: str) -> None:
        """model_config.pre_seq_len / prefix_projection alone would be silently ignored: they must go with
        pet_config.pet_type ptuning2 (which MindFormers reads) and agree with it."""
        p = self.ptuning
        if p is None:
            if self.pre_seq_len or self.prefix_projection:   # 0 means none, as in MindFormers
                name = "pre_seq_len" if self.pre_seq_len else "prefix_projection"
                raise GLMError(f"{where}.{name}: P-Tuning v2 is set in {where}.pet_config: {{pet_type: ptuning2, "
                               f"pre_seq_len: N, prefix_projection: ...}}; without it {name} would be ignored")
            return
        if self.pre_seq_len and self.pre_seq_len != p.pre_seq_len:
            raise GLMError(f"{where}.pre_seq_len: {self.pre_seq_len} but {where}.pet_config.pre_seq_len is "
                           f"{p.pre_seq_len}; make them equal (or drop the model-level key)")
        if self.prefix_projection and not p.prefix_projection:
            raise GLMError(f"{where}.prefix_projection: True but {where}.pet_config.prefix_projection is False; "
                           "P-Tuning v2 reads pet_config (set it there)")

    @property
    def eos_token_ids(self) -> list:
        e = self.eos_token_id
        return list(e) if isinstance(e, (list, tuple)) else [e]
