"""`--run_mode export`: the exported prefill/decode MindIR pair, reloaded as GraphCells and driven from
numpy, must greedy-decode exactly the tokens that `Generator` (the in-process KV-cache path) produces."""

from __future__ import annotations

import json

import numpy as np
import pytest

from glm import GLMError
from glm.build import build_model, init_process, model_config
from glm.export import graph_inputs, run_export
from glm.generate import GenerationConfig, Generator
from glm.runtime import ms
from glm.weights import write_ms_checkpoint

PROMPTS = [[5, 17, 33, 9, 71, 2, 40], [8, 3, 99]]   # two rows of different lengths
NEW = 12
MODEL = dict(num_layers=2, hidden_size=64, num_attention_heads=4, kv_channels=16, multi_query_group_num=2,
             ffn_hidden_size=96, padded_vocab_size=128, seq_length=64, batch_size=2,
             initializer_range=0.3)   # large init: logits differ clearly between tokens


def make_cfg(out, ckpt, **model_extra) -> dict:
    return {"context": {"device_target": "CPU", "mode": 0}, "seed": 7, "output_dir": str(out),
            "load_checkpoint": ckpt, "model": {"model_config": {**MODEL, **model_extra}}}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Random seeded weights saved as a checkpoint, and Generator's greedy tokens for PROMPTS."""
    d = tmp_path_factory.mktemp("export")
    cfg = make_cfg(d, None)
    init_process(cfg)
    model, _ = build_model(cfg, use_past=True)
    ckpt = str(d / "weights.ckpt")
    write_ms_checkpoint({p.name: p.asnumpy() for p in model.get_parameters() if not p.name.endswith("_cache")},
                        ckpt)
    gen = GenerationConfig(max_new_tokens=NEW, eos_token_id=[-1])   # no eos: always NEW tokens
    tokens = Generator(model).generate(PROMPTS, gen)
    assert [len(t) for t in tokens] == [NEW, NEW]
    return ckpt, tokens


def load(path, placeholders=None) -> ms.nn.GraphCell:
    g = ms.nn.GraphCell(ms.load(str(path)))
    if placeholders is not None:
        g.set_inputs(*placeholders)   # required for dynamic graphs after ms.load
    return g


def greedy(out, info, dynamic: bool) -> list:
    """Serve the exported pair the way export_info.json describes it."""
    p, d = info["graphs"]["prefill"], info["graphs"]["decode"]
    mcfg = model_config(make_cfg(out, None))
    prefill = load(out / p["file"], graph_inputs(mcfg, "prefill", True) if dynamic else None)
    decode = load(out / d["file"], graph_inputs(mcfg, "decode", True) if dynamic else None)
    cache_spec = p["inputs"][-1]
    cache = ms.Tensor(np.zeros(cache_spec["shape"], np.float32), getattr(ms, cache_spec["dtype"]))
    lengths = np.array([len(q) for q in PROMPTS], np.int32)
    width = int(lengths.max()) if dynamic else info["model"]["seq_length"]
    ids = np.full((len(PROMPTS), width), info["model"]["pad_token_id"], np.int32)
    for r, q in enumerate(PROMPTS):
        ids[r, :len(q)] = q
    pos = np.broadcast_to(np.arange(width, dtype=np.int32), ids.shape).copy()
    logits, cache = prefill(ms.Tensor(ids), ms.Tensor(pos), ms.Tensor(lengths - 1), cache)
    tokens = [[] for _ in PROMPTS]
    for step in range(NEW):
        chosen = logits.asnumpy().argmax(-1).astype(np.int32)
        for r, t in enumerate(chosen):
            tokens[r].append(int(t))
        if step + 1 < NEW:   # each row writes at its own next position
            logits, cache = decode(ms.Tensor(chosen.reshape(-1, 1)), ms.Tensor((lengths + step).reshape(-1, 1)),
                                   cache)
    return tokens


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_exported_pair_decodes_like_predict(reference, tmp_path, dynamic):
    ckpt, want = reference
    extra = {"is_dynamic": True} if dynamic else {}
    info = run_export(make_cfg(tmp_path, ckpt, **extra))
    assert (tmp_path / "mindir_full_checkpoint" / "rank_0_graph.mindir").is_file()
    assert (tmp_path / "mindir_inc_checkpoint" / "rank_0_graph.mindir").is_file()
    assert json.loads((tmp_path / "export_info.json").read_text()) == info
    assert info["dynamic_prompt_length"] is dynamic and info["model"]["vocab_size"] == 128
    assert not [p for p in tmp_path.rglob(".export-tmp*")]   # temp folders are gone
    assert greedy(tmp_path, info, dynamic) == want


def test_infer_paths_are_honoured(reference, tmp_path):
    cfg = make_cfg(tmp_path / "out", reference[0])
    cfg["infer"] = {"prefill_model_path": str(tmp_path / "serve" / "prefill.mindir"),
                    "increment_model_path": str(tmp_path / "serve" / "decode.mindir")}
    info = run_export(cfg)
    assert sorted(p.name for p in (tmp_path / "serve").iterdir()) == ["decode.mindir", "prefill.mindir"]
    assert info["graphs"]["decode"]["file"] == str(tmp_path / "serve" / "decode.mindir")


def test_export_needs_a_checkpoint(tmp_path):
    with pytest.raises(GLMError, match="needs load_checkpoint") as err:
        run_export(make_cfg(tmp_path, None))
    assert "\n" not in str(err.value)
    assert not (tmp_path / "mindir_full_checkpoint").exists()
