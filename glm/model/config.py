"""GLM model hyper-parameters, named as in MindFormers' `model.model_config` YAML section."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

from glm import GLMError

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
    for key in ("pre_seq_len", "projection_dim"):
        v = getattr(s, key)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise GLMError(f"{where}.{key}: expected a positive integer, got {v!r}")
    if not 0.0 <= float(s.dropout_prob) < 1.0:
        raise GLMError(f"{where}.dropout_prob: expected a probability in [0, 1), got {s.dropout_prob!r}")
    return s


@dataclass
class GLMConfig:
    """ChatGLM2-6B and ChatGLM3-6B share this architecture; only the tokenizer differs."""

    num_layers: int = 28
    padded_vocab_size: int = 65024
    hidden_size: int = 4096
    ffn_hidden_size: int = 13696
    kv_channels: int = 128
    num_attention_heads: int = 32
    multi_query_attention: bool = True
    multi_query_group_num: int = 2
    seq_length: int = 2048
    layernorm_epsilon: float = 1e-5
    rmsnorm: bool = True
    post_layer_norm: bool = True
    apply_residual_connection_post_layernorm: bool = False
    add_bias_linear: bool = False
    add_qkv_bias: bool = True
    rope_ratio: float = 1.0
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    param_init_type: str = "float32"
    compute_dtype: str = "float32"
    layernorm_compute_type: str = "float32"
    use_past: bool = False
    use_flash_attention: bool = False
    is_dynamic: bool = False          # export: a dynamic prompt-length dimension in the prefill graph
    batch_size: int = 1
    eos_token_id: Any = 2
    pad_token_id: int = 0
    # Generation defaults (MindFormers keeps them in the model section).
    max_decode_length: int = 256
    repetition_penalty: float = 1.0
    top_k: int = 1
    top_p: float = 1.0
    do_sample: bool = False
    # Accepted for compatibility with MindFormers YAMLs; they do not change the math here.
    apply_query_key_layer_scaling: bool = True
    attention_softmax_in_fp32: bool = True
    fp32_residual_connection: bool = False
    bias_dropout_fusion: bool = True
    quantization_bit: int = 0
    # P-Tuning v2 is configured in pet_config (pet_type: ptuning2), as MindFormers does; these two
    # model-level keys may only repeat its values (see `prefix_len`).
    pre_seq_len: Optional[int] = None
    prefix_projection: bool = False
    checkpoint_name_or_path: str = ""
    type: str = "ChatGLM2Config"
    initializer_range: float = 0.02
    pet_config: Optional[dict] = None
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
        for key, value in (d or {}).items():
            if key not in known:
                close = difflib.get_close_matches(key, sorted(known), n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise GLMError(f"{where}: unknown key {key!r}{hint}")
            kwargs[key] = value
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
            if self.pre_seq_len is not None or self.prefix_projection:
                key = "pre_seq_len" if self.pre_seq_len is not None else "prefix_projection"
                raise GLMError(f"{where}.{key}: P-Tuning v2 is set in {where}.pet_config: {{pet_type: ptuning2, "
                               f"pre_seq_len: N, prefix_projection: ...}}; without it {key} would be ignored")
            return
        if self.pre_seq_len is not None and self.pre_seq_len != p.pre_seq_len:
            raise GLMError(f"{where}.pre_seq_len: {self.pre_seq_len} but {where}.pet_config.pre_seq_len is "
                           f"{p.pre_seq_len}; make them equal (or drop the model-level key)")
        if self.prefix_projection and not p.prefix_projection:
            raise GLMError(f"{where}.prefix_projection: True but {where}.pet_config.prefix_projection is False; "
                           "P-Tuning v2 reads pet_config (set it there)")

    @property
    def eos_token_ids(self) -> list:
        e = self.eos_token_id
        return list(e) if isinstance(e, (list, tuple)) else [e]
