"""glm.parallel: CPU refusal of model/pipeline parallel, and tools/transform_ckpt.py (data-parallel merge)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

import glm.runtime  # noqa: F401  (sets GLOG_v before mindspore is imported)
from glm import GLMError
from glm.parallel import CPU_PARALLEL_ERROR, check_parallel_support, init_distributed

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tools import transform_ckpt  # noqa: E402


@pytest.mark.parametrize("cfg_parallel, parallel_config", [
    ({}, {"model_parallel": 2}),
    ({}, {"pipeline_stage": 2}),
    ({"parallel_mode": "semi_auto_parallel"}, {}),
    ({"parallel_mode": 1}, {"model_parallel": 1}),
])
def test_cpu_refuses_model_parallel(cfg_parallel: dict, parallel_config: dict) -> None:
    # The check runs before mindspore.communication.init(), so no cluster is needed.
    with pytest.raises(GLMError) as e:
        init_distributed(cfg_parallel, parallel_config, "CPU")
    assert str(e.value) == CPU_PARALLEL_ERROR


def test_parallel_support_accepts() -> None:
    assert check_parallel_support({}, {"data_parallel": 2, "model_parallel": 1}, "CPU") == "data_parallel"
    assert check_parallel_support({"parallel_mode": "semi_auto_parallel"}, {"model_parallel": 2},
                                  "Ascend") == "semi_auto_parallel"
    with pytest.raises(GLMError, match="parallel_mode"):
        check_parallel_support({"parallel_mode": "tensor"}, {}, "Ascend")
    with pytest.raises(GLMError, match="model_parallel"):
        check_parallel_support({}, {"model_parallel": "two"}, "CPU")


# ----------------------------------------------------------------------------------------------
# transform_ckpt: data-parallel merge, for real with small checkpoints
# ----------------------------------------------------------------------------------------------

def _params(seed: int, shift: float = 0.0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"embedding.weight": rng.standard_normal((8, 4)).astype(np.float32) + shift,
            "layers.0.dense.weight": rng.standard_normal((4, 4)).astype(np.float32),
            "layers.0.dense.bias": np.zeros(4, np.float16)}


def _save(path: Path, params: dict[str, np.ndarray]) -> None:
    import mindspore as ms

    path.parent.mkdir(parents=True, exist_ok=True)
    ms.save_checkpoint([{"name": k, "data": ms.Tensor(v)} for k, v in params.items()], str(path))


def test_dp_merge_writes_rank0_and_loads(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import mindspore as ms

    src, dst = tmp_path / "ckpt", tmp_path / "merged"
    params = _params(0)
    _save(src / "rank_0" / "glm-1_8.ckpt", _params(1))   # older step: must not be chosen
    _save(src / "rank_0" / "glm-1_16.ckpt", params)
    _save(src / "rank_1" / "glm-1_16.ckpt", params)
    assert transform_ckpt.main(["--src_ckpt_dir", str(src), "--dst_ckpt_dir", str(dst),
                                "--prefix", "glm2_6b_", "--check_values"]) == 0
    out = dst / "rank_0" / "glm2_6b_0.ckpt"
    loaded = ms.load_checkpoint(str(out))
    assert sorted(loaded) == sorted(params)
    for name, value in params.items():
        np.testing.assert_array_equal(loaded[name].asnumpy(), value)
    assert not [f for f in os.listdir(out.parent) if f.startswith(".tmp-")]
    assert "warning" not in capsys.readouterr().err


def test_dp_merge_warns_on_different_values(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    src = tmp_path / "ckpt"
    _save(src / "rank_0" / "a.ckpt", _params(0))
    _save(src / "rank_1" / "a.ckpt", _params(0, shift=0.5))
    assert transform_ckpt.main(["--src_ckpt_dir", str(src), "--dst_ckpt_dir", str(tmp_path / "o"),
                                "--check_values"]) == 0
    err = capsys.readouterr().err
    assert "rank 1 differs from rank 0: max |diff| 0.5" in err and "embedding.weight" in err
    assert (tmp_path / "o" / "rank_0" / "checkpoint_0.ckpt").is_file()


def test_dp_merge_refuses_different_parameter_sets(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    src = tmp_path / "ckpt"
    _save(src / "rank_0" / "a.ckpt", _params(0))
    other = _params(0)
    other.pop("layers.0.dense.bias")
    _save(src / "rank_1" / "a.ckpt", other)
    assert transform_ckpt.main(["--src_ckpt_dir", str(src), "--dst_ckpt_dir", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err.strip()
    assert "different parameter set" in err and "layers.0.dense.bias" in err and "\n" not in err
    assert not (tmp_path / "o" / "rank_0" / "checkpoint_0.ckpt").exists()


def test_dp_merge_refuses_different_shapes(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    src = tmp_path / "ckpt"
    _save(src / "rank_0" / "a.ckpt", _params(0))
    other = _params(0)
    other["embedding.weight"] = other["embedding.weight"][:4]
    _save(src / "rank_1" / "a.ckpt", other)
    assert transform_ckpt.main(["--src_ckpt_dir", str(src), "--dst_ckpt_dir", str(tmp_path / "o")]) == 1
    assert "parameter embedding.weight is ((4, 4)" in capsys.readouterr().err


@pytest.mark.parametrize("layout, message", [
    (None, "no such directory"),
    ([], "no rank_* subdirectories"),
    (["rank_0/a.ckpt", "rank_1/"], "no .ckpt file"),
    (["rank_0/a.ckpt", "rank_2/a.ckpt"], "rank directories missing: rank_1"),
])
def test_layout_errors(tmp_path: Path, capsys: pytest.CaptureFixture, layout, message: str) -> None:
    src = tmp_path / "ckpt"
    if layout is not None:
        src.mkdir()
        for entry in layout:
            target = src / entry
            if entry.endswith("/"):
                target.mkdir(parents=True)
            else:
                _save(target, _params(0))
    assert transform_ckpt.main(["--src_ckpt_dir", str(src), "--dst_ckpt_dir", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_missing_strategy_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert transform_ckpt.main(["--src_ckpt_strategy", str(tmp_path / "nope.ckpt"), "--src_ckpt_dir",
                                str(tmp_path), "--dst_ckpt_dir", str(tmp_path / "o")]) == 1
    assert "--src_ckpt_strategy" in capsys.readouterr().err
