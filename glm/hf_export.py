"""The files that make an exported weights folder loadable by `from_pretrained`: config.json,
generation_config.json and the tokenizer (tokenizer.model for SentencePiece users, tokenizer.json +
tokenizer_config.json for `AutoTokenizer`).

* layout "glm_hf": transformers' native `GlmForCausalLM` (model_type "glm"), no remote code;
* layout "chatglm_hf": THUDM's ChatGLM config (model_type "chatglm"); loading the model needs their
  modeling_chatglm.py (trust_remote_code), which is not ours to ship; the tokenizer loads without it.

The tokenizer.json is the SentencePiece BPE model rebuilt for the `tokenizers` library (the recipe
transformers uses for Llama's SentencePiece files) with the GLM special tokens at the same ids as
glm/tokenizer.py and the [gMASK] sop prefix added like `GLMTokenizer.encode`.
"""

from __future__ import annotations

from pathlib import Path

from glm import GLMError
from glm.io import atomic_path, write_bytes_atomic, write_json_atomic
from glm.model.config import GLMConfig


def glm_hf_config(m: GLMConfig, eos: list[int]) -> dict:
    """transformers GlmConfig for the same function (see research/peer_transformers_glm.md)."""
    unsupported = [k for k, ok in (("rmsnorm", m.rmsnorm), ("post_layer_norm", m.post_layer_norm),
                                   ("apply_residual_connection_post_layernorm",
                                    not m.apply_residual_connection_post_layernorm),
                                   ("add_bias_linear", not m.add_bias_linear)) if not ok]
    if unsupported:
        raise GLMError(f"--layout glm_hf: model_config.{unsupported[0]}={getattr(m, unsupported[0])} has no "
                       "GlmForCausalLM equivalent; use --layout chatglm_hf")
    return {"architectures": ["GlmForCausalLM"], "model_type": "glm",
            "vocab_size": m.padded_vocab_size, "hidden_size": m.hidden_size,
            "intermediate_size": m.ffn_hidden_size, "num_hidden_layers": m.num_layers,
            "num_attention_heads": m.num_attention_heads, "num_key_value_heads": m.num_kv_heads,
            "head_dim": m.head_dim, "hidden_act": "silu", "rms_norm_eps": m.layernorm_epsilon,
            "attention_bias": m.add_qkv_bias, "attention_dropout": 0.0,
            "max_position_embeddings": m.seq_length, "initializer_range": m.initializer_range,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0 * m.rope_ratio,
                                "partial_rotary_factor": 0.5},
            "tie_word_embeddings": False, "use_cache": True, "pad_token_id": m.pad_token_id,
            "eos_token_id": eos, "bos_token_id": None, "dtype": m.param_init_type}


def chatglm_hf_config(m: GLMConfig, eos: list[int]) -> dict:
    """THUDM ChatGLM2/3 config.json (their modeling code reads these names)."""
    keys = ("num_layers", "padded_vocab_size", "hidden_size", "ffn_hidden_size", "kv_channels",
            "num_attention_heads", "multi_query_attention", "multi_query_group_num", "seq_length",
            "layernorm_epsilon", "rmsnorm", "post_layer_norm", "apply_residual_connection_post_layernorm",
            "add_bias_linear", "add_qkv_bias", "rope_ratio", "hidden_dropout", "attention_dropout",
            "apply_query_key_layer_scaling", "attention_softmax_in_fp32", "fp32_residual_connection",
            "bias_dropout_fusion", "quantization_bit", "pre_seq_len", "prefix_projection")
    body = {k: getattr(m, k) for k in keys}
    body["vocab_size"] = m.padded_vocab_size
    return {"architectures": ["ChatGLMModel"], "model_type": "chatglm",
            "auto_map": {"AutoConfig": "configuration_chatglm.ChatGLMConfig",
                         "AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration",
                         "AutoModelForCausalLM": "modeling_chatglm.ChatGLMForConditionalGeneration"},
            **body, "original_rope": True, "tie_word_embeddings": False, "use_cache": True,
            "torch_dtype": m.param_init_type, "eos_token_id": eos[0], "pad_token_id": m.pad_token_id}


def generation_config(m: GLMConfig, eos: list[int]) -> dict:
    """The config's decoding defaults in transformers' GenerationConfig names."""
    body = {"eos_token_id": eos, "pad_token_id": m.pad_token_id, "max_length": m.max_decode_length}
    sample = m.do_sample and m.top_k != 1      # top_k 1 is how the reference YAMLs spell greedy
    body["do_sample"] = bool(sample)
    if sample:
        body.update(temperature=float(m.temperature), top_p=m.top_p,
                    top_k=m.top_k)
    if m.repetition_penalty != 1.0:
        body["repetition_penalty"] = m.repetition_penalty
    return body


def _merges(vocab: dict[str, int]) -> list[tuple[str, str]]:
    """BPE merges implied by a SentencePiece BPE vocabulary: every split of a piece into two pieces, ranked
    by the merged piece's id (SentencePiece orders pieces by score)."""
    merges = []
    for piece, rank in vocab.items():
        local = [(piece[:i], piece[i:]) for i in range(1, len(piece)) if piece[:i] in vocab and piece[i:] in vocab]
        merges += [(left, right, rank) for left, right in sorted(local, key=lambda p: (vocab[p[0]], vocab[p[1]]))]
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])))
    return [(left, right) for left, right, _ in merges]


def build_fast_tokenizer(tok):
    """A `tokenizers.Tokenizer` that encodes like `tok.encode` (prefix included) and decodes like it."""
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers, processors
    from tokenizers.models import BPE

    sp = tok.sp
    vocab = {sp.id_to_piece(i): i for i in range(sp.vocab_size())}
    fast = Tokenizer(BPE(vocab, _merges(vocab), unk_token=sp.id_to_piece(sp.unk_id()), fuse_unk=True,
                         byte_fallback=True))
    fast.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    fast.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                      decoders.Strip(content=" ", left=1, right=0)])
    specials = sorted(tok.special_tokens.items(), key=lambda kv: kv[1])
    fast.add_special_tokens([AddedToken(name, special=True, normalized=False) for name, _ in specials])
    for name, i in specials:
        if fast.token_to_id(name) != i:
            raise GLMError(f"tokenizer export: {name} got id {fast.token_to_id(name)}, expected {i}")
    gmask, sop = "[gMASK]", "sop"
    fast.post_processor = processors.TemplateProcessing(
        single=f"{gmask} {sop} $A", pair=f"{gmask} {sop} $A $B",
        special_tokens=[(gmask, tok.gmask_id), (sop, tok.sop_id)])
    return fast


def write_tokenizer(tok, folder: Path, seq_length: int) -> list[Path]:
    """tokenizer.model (copied), tokenizer.json and tokenizer_config.json into `folder`."""
    folder = Path(folder)
    written = [write_bytes_atomic(folder / "tokenizer.model", Path(tok.vocab_file).read_bytes())]
    sp = tok.sp
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": seq_length,
              "unk_token": sp.id_to_piece(sp.unk_id()), "pad_token": sp.id_to_piece(tok.pad_id),
              "eos_token": sp.id_to_piece(tok.eos_id), "padding_side": "left",
              "clean_up_tokenization_spaces": False,
              "glm_tokenizer": type(tok).__name__}   # which glm-launcher tokenizer (and chat format) this is
    try:
        fast = build_fast_tokenizer(tok)
    except ImportError:
        print("warning: the `tokenizers` package is not installed: tokenizer.json not written "
              "(pip install tokenizers, or use tokenizer.model with sentencepiece)")
    else:
        with atomic_path(folder / "tokenizer.json") as tmp:
            fast.save(str(tmp))
        written.append(folder / "tokenizer.json")
    written.append(write_json_atomic(config, folder / "tokenizer_config.json"))
    return written


def write_hf_metadata(folder: Path, m: GLMConfig, layout: str, tok=None) -> list[Path]:
    """config.json, generation_config.json and (with a tokenizer) the tokenizer files."""
    folder = Path(folder)
    eos = sorted({*(m.eos_token_id if isinstance(m.eos_token_id, (list, tuple)) else [m.eos_token_id]),
                  *(tok.stop_token_ids if tok is not None else [])})
    config = glm_hf_config(m, eos) if layout == "glm_hf" else chatglm_hf_config(m, eos)
    written = [write_json_atomic(config, folder / "config.json"),
               write_json_atomic(generation_config(m, eos), folder / "generation_config.json")]
    if tok is not None:
        written += write_tokenizer(tok, folder, m.seq_length)
    return written
