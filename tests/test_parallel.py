"""glm.parallel: CPU refusal of model/pipeline parallel, the semi-auto pass-through (mocked: it needs
Ascend/GPU), the trainer's data-parallel plan, and glm/transform_ckpt.py (through its old path tools/transform_ckpt.py)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

import glm.runtime  # noqa: F401  (sets GLOG_v before mindspore is imported)
from glm import GLMError
from glm.parallel import (
    SEMI_AUTO_FULL_BATCH_ERROR,
    check_parallel_support,
    data_parallel_plan,
    init_distributed,
    semi_auto_context,
)
from glm.sections import ParallelConfig, ParallelSection
from glm.settings import resolve

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tools import transform_ckpt  # noqa: E402


@pytest.mark.parametrize("cfg_parallel, parallel_config, wrong", [
    ({}, {"model_parallel": 2}, "parallel_config.model_parallel: 2 needs Ascend or GPU; on CPU use 1"),
    ({}, {"pipeline_stage": 2}, "parallel_config.pipeline_stage: 2 needs Ascend or GPU; on CPU use 1"),
    ({"parallel_mode": "semi_auto_parallel"}, {},
     "parallel.parallel_mode: 'semi_auto_parallel' (semi_auto_parallel) needs Ascend or GPU; on CPU use 0 "
     "(data parallel)"),
    ({"parallel_mode": 1}, {"model_parallel": 1},
     "parallel.parallel_mode: 1 (semi_auto_parallel) needs Ascend or GPU; on CPU use 0 (data parallel)"),
])
def test_cpu_refuses_model_parallel(cfg_parallel: dict, parallel_config: dict, wrong: str) -> None:
    # The check runs before mindspore.communication.init(), so no cluster is needed. The message names the
    # key that is wrong, not model_parallel/pipeline_stage when they are 1.
    with pytest.raises(GLMError) as e:
        init_distributed(ParallelSection(**cfg_parallel), ParallelConfig(**parallel_config), "CPU")
    assert str(e.value) == wrong


def test_parallel_support_accepts() -> None:
    assert check_parallel_support(ParallelSection(), ParallelConfig(data_parallel=2, model_parallel=1),
                                  "CPU") == "data_parallel"
    assert check_parallel_support(ParallelSection(parallel_mode="semi_auto_parallel"),
                                  ParallelConfig(model_parallel=2), "Ascend") == "semi_auto_parallel"
    with pytest.raises(GLMError, match="parallel_mode"):
        check_parallel_support(ParallelSection(parallel_mode="tensor"), ParallelConfig(), "Ascend")
    with pytest.raises(GLMError, match="model_parallel"):   # types are the loader's to check, once
        _cfg("parallel_config.model_parallel=two")


# ----------------------------------------------------------------------------------------------
# semi-auto parallel pass-through (Ascend/GPU): what reaches ms.set_auto_parallel_context
# ----------------------------------------------------------------------------------------------

REPO = Path(__file__).resolve().parents[1]


def _cfg(*overrides: str, path: str = "configs/glm3/run_glm3_6b.yaml") -> dict:
    from glm.config import load_config

    return load_config(REPO / path, list(overrides))


def _run(*overrides: str):
    """The typed config the run modes receive."""
    return resolve(_cfg(*overrides))


@pytest.fixture
def fake_cluster(monkeypatch: pytest.MonkeyPatch):
    """Communication init and the auto-parallel context replaced by recorders (rank 3 of 8)."""
    import mindspore as ms
    import mindspore.communication as comm

    calls: dict = {"init": 0, "context": []}
    monkeypatch.setattr(comm, "init", lambda *a, **k: calls.__setitem__("init", calls["init"] + 1))
    monkeypatch.setattr(comm, "get_rank", lambda *a, **k: 3)
    monkeypatch.setattr(comm, "get_group_size", lambda *a, **k: 8)
    monkeypatch.setattr(ms, "reset_auto_parallel_context", lambda: None)
    monkeypatch.setattr(ms, "set_auto_parallel_context", lambda **kw: calls["context"].append(kw))
    return calls


def test_semi_auto_pass_through(fake_cluster) -> None:
    import mindspore as ms

    cfg = _cfg("parallel_config.model_parallel=2", "parallel_config.pipeline_stage=2",
               "parallel.strategy_ckpt_config.save_file=./strategy/ckpt_strategy.ckpt")
    assert cfg["parallel"]["pipeline_stages"] is None and cfg["parallel"]["dataset_strategy"] is None
    run = resolve(cfg)
    assert init_distributed(run.parallel, run.parallel_config, "Ascend") == (3, 8)
    assert fake_cluster["init"] == 1
    [kw] = fake_cluster["context"]
    assert kw == {
        "parallel_mode": ms.ParallelMode.SEMI_AUTO_PARALLEL, "device_num": 8,
        "pipeline_stages": 2, "full_batch": True, "gradients_mean": False, "loss_repeated_mean": True,
        "enable_alltoall": False, "enable_parallel_optimizer": True, "search_mode": "sharding_propagation",
        "strategy_ckpt_config": {"save_file": "./strategy/ckpt_strategy_rank_3.ckpt", "load_file": "",
                                 "only_trainable_params": True},
    }
    # MindSpore's own argument checks accept every value (a None left in would raise TypeError here).
    import mindspore.parallel._auto_parallel_context as apc

    try:
        for key, value in kw.items():
            apc._set_auto_parallel_context_func_map[key](value)
        assert apc.auto_parallel_context().get_pipeline_stages() == 2
    finally:
        apc.auto_parallel_context().reset()


def test_semi_auto_strategy_files_and_stages(fake_cluster) -> None:
    import mindspore as ms

    run = _run("parallel.parallel_mode=auto_parallel", "parallel.strategy_ckpt_load_file=/s/merged.ckpt",
               "parallel.strategy_ckpt_save_file=/s/out", "parallel.pipeline_stages=4",
               "parallel_config.pipeline_stage=4", "parallel.dataset_strategy=full_batch")
    init_distributed(run.parallel, run.parallel_config, "GPU")
    [kw] = fake_cluster["context"]
    assert kw["parallel_mode"] == ms.ParallelMode.AUTO_PARALLEL and kw["pipeline_stages"] == 4
    assert kw["strategy_ckpt_config"]["load_file"] == "/s/merged.ckpt"     # flat keys win over the dict
    assert kw["strategy_ckpt_config"]["save_file"] == "/s/out_rank_3.ckpt"
    assert "dataset_strategy" not in kw and kw["full_batch"] is True
    with pytest.raises(GLMError, match="pipeline_stages 2 disagrees with parallel_config.pipeline_stage 4"):
        semi_auto_context(ParallelSection(pipeline_stages=2), ParallelConfig(pipeline_stage=4), 0)


def test_data_parallel_context_unchanged(fake_cluster) -> None:
    import mindspore as ms

    run = _run("parallel.parallel_mode=0", "parallel.gradients_mean=True")
    init_distributed(run.parallel, run.parallel_config, "Ascend")
    assert fake_cluster["context"] == [{"parallel_mode": ms.ParallelMode.DATA_PARALLEL, "gradients_mean": True,
                                        "device_num": 8}]


@pytest.mark.parametrize("overrides", [
    ["parallel.full_batch=False"],
    ["parallel.dataset_strategy=data_parallel"],
    ["parallel.dataset_strategy=[[2, 1], [2, 1]]"],
])
def test_semi_auto_refuses_sliced_batches(fake_cluster, overrides: list[str]) -> None:
    run = _run(*overrides)
    with pytest.raises(GLMError) as e:
        init_distributed(run.parallel, run.parallel_config, "Ascend")
    assert str(e.value) == SEMI_AUTO_FULL_BATCH_ERROR
    assert fake_cluster["init"] == 0   # refused before communication starts


@pytest.mark.parametrize("overrides, target, world, plan", [
    ([], "Ascend", 1, (False, False)),                                            # one process
    (["parallel.parallel_mode=0"], "CPU", 2, (True, True)),                       # data parallel
    (["parallel.parallel_mode=data_parallel", "parallel.full_batch=True"], "GPU", 8, (True, True)),
    (["parallel.parallel_mode=1", "parallel_config.model_parallel=2"], "Ascend", 8, (False, False)),
    (["parallel.parallel_mode=auto_parallel"], "GPU", 4, (False, False)),
])
def test_data_parallel_plan(overrides: list[str], target: str, world: int, plan: tuple[bool, bool]) -> None:
    assert data_parallel_plan(_run(*overrides), world, target) == plan


def test_data_parallel_plan_refusals() -> None:
    with pytest.raises(GLMError, match="needs Ascend or GPU"):
        data_parallel_plan(_run("parallel.parallel_mode=1"), 2, "CPU")
    with pytest.raises(GLMError, match="full_batch: True"):
        data_parallel_plan(_run("parallel.parallel_mode=1", "parallel.full_batch=False"), 2, "Ascend")


@pytest.mark.parametrize("mode, target, sharded", [(1, "Ascend", False), (0, "CPU", True)])
def test_trainer_follows_the_plan(tmp_path: Path, mode: int, target: str, sharded: bool) -> None:
    """Rank 1 of 2 (no communication needed to build the trainer): data parallel shards the data and
    reduces gradients itself; semi-auto reads the full batch and leaves the reduction to MindSpore."""
    from glm.build import Process
    from glm.train import Trainer

    cfg = _cfg(f"parallel.parallel_mode={mode}", f"output_dir={tmp_path}", path="configs/glm2/run_glm2_tiny.yaml")
    trainer = Trainer(cfg, "train", proc=Process(rank=1, world=2, device_target=target))
    if sharded:
        assert (trainer.data.num_shards, trainer.data.shard_id) == (2, 1)
        assert type(trainer.step_fn.reducer).__name__ == "DistributedGradReducer"
    else:
        assert trainer.data.num_shards is None and trainer.data.shard_id is None
        assert trainer.step_fn.reducer is None


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
    assert transform_ckpt.main(["--src_ckpt_dir", str(src), "--dst_ckpt_dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert "different parameter set" in err and "layers.0.dense.bias" in err and "\n" not in err
    assert not (tmp_path / "o" / "rank_0" / "checkpoint_0.ckpt").exists()


def test_dp_merge_refuses_different_shapes(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    src = tmp_path / "ckpt"
    _save(src / "rank_0" / "a.ckpt", _params(0))
    other = _params(0)
    other["embedding.weight"] = other["embedding.weight"][:4]
    _save(src / "rank_1" / "a.ckpt", other)
    assert transform_ckpt.main(["--src_ckpt_dir", str(src), "--dst_ckpt_dir", str(tmp_path / "o")]) == 2
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
    assert transform_ckpt.main(["--src_ckpt_dir", str(src), "--dst_ckpt_dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_missing_strategy_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert transform_ckpt.main(["--src_ckpt_strategy", str(tmp_path / "nope.ckpt"), "--src_ckpt_dir",
                                str(tmp_path), "--dst_ckpt_dir", str(tmp_path / "o")]) == 2
    assert "--src_ckpt_strategy" in capsys.readouterr().err


def test_check_values_with_a_strategy_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    # Sharded ranks are not copies: --check_values would be ignored there, so it is an error.
    (tmp_path / "s.ckpt").write_bytes(b"")
    assert transform_ckpt.main(["--src_ckpt_strategy", str(tmp_path / "s.ckpt"), "--src_ckpt_dir", str(tmp_path),
                                "--dst_ckpt_dir", str(tmp_path / "o"), "--check_values"]) == 2
    assert "--check_values compares data-parallel copies" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------------------------
# transform_ckpt with strategy files: MindSpore's functions mocked (sharded checkpoints need Ascend/GPU)
# ----------------------------------------------------------------------------------------------

@pytest.fixture
def ms_transform(monkeypatch: pytest.MonkeyPatch):
    import mindspore as ms

    calls: dict = {"merge": [], "transform": []}

    def merge(src_dir: str, dst_file: str) -> None:
        calls["merge"].append((src_dir, dst_file))
        Path(dst_file).write_bytes(b"merged")

    monkeypatch.setattr(ms, "merge_pipeline_strategys", merge)
    monkeypatch.setattr(ms, "transform_checkpoints", lambda *a: calls["transform"].append(a))
    return calls


def _sharded(tmp_path: Path) -> Path:
    src = tmp_path / "output" / "checkpoint_network"
    for rank in (0, 1):
        _save(src / f"rank_{rank}" / f"glm_rank_{rank}-network.ckpt", _params(rank))
    return src


def test_strategy_directory_is_merged_first(tmp_path: Path, ms_transform: dict) -> None:
    src, dst, strategy = _sharded(tmp_path), tmp_path / "merged", tmp_path / "output" / "strategy"
    strategy.mkdir()
    for rank in (0, 1):
        (strategy / f"ckpt_strategy_rank_{rank}.ckpt").write_bytes(b"s")
    assert transform_ckpt.main(["--src_ckpt_strategy", str(strategy), "--src_ckpt_dir", str(src),
                                "--dst_ckpt_dir", str(dst), "--prefix", "glm2_6b"]) == 0
    merged = str(strategy / "merged_ckpt_strategy.ckpt")
    assert ms_transform["merge"] == [(str(strategy), merged)]
    assert ms_transform["transform"] == [(str(src), str(dst), "glm2_6b", merged, None)]
    assert dst.is_dir()


@pytest.mark.parametrize("dst_strategy", [None, "", "None", "none"])
def test_strategy_file_and_none_destination(tmp_path: Path, ms_transform: dict, dst_strategy) -> None:
    src, strategy = _sharded(tmp_path), tmp_path / "strategy.ckpt"
    strategy.write_bytes(b"s")
    argv = ["--src_ckpt_strategy", str(strategy), "--src_ckpt_dir", str(src), "--dst_ckpt_dir", str(tmp_path / "o")]
    if dst_strategy is not None:
        argv += ["--dst_ckpt_strategy", dst_strategy]
    assert transform_ckpt.main(argv) == 0
    assert ms_transform["merge"] == []   # a file is used as it is
    assert ms_transform["transform"] == [(str(src), str(tmp_path / "o"), "checkpoint_", str(strategy), None)]


def test_destination_strategy_directory(tmp_path: Path, ms_transform: dict) -> None:
    src, a, b = _sharded(tmp_path), tmp_path / "a.ckpt", tmp_path / "dst_strategy"
    a.write_bytes(b"s")
    b.mkdir()
    assert transform_ckpt.main(["--src_ckpt_strategy", str(a), "--dst_ckpt_strategy", str(b), "--src_ckpt_dir",
                                str(src), "--dst_ckpt_dir", str(tmp_path / "o")]) == 0
    assert ms_transform["merge"] == [(str(b), str(b / "merged_ckpt_strategy.ckpt"))]
    assert ms_transform["transform"][0][3:] == (str(a), str(b / "merged_ckpt_strategy.ckpt"))


def test_no_source_strategy_never_calls_transform(tmp_path: Path, ms_transform: dict,
                                                 capsys: pytest.CaptureFixture) -> None:
    src, strategy = _sharded(tmp_path), tmp_path / "s.ckpt"
    strategy.write_bytes(b"s")
    assert transform_ckpt.main(["--src_ckpt_strategy", "None", "--dst_ckpt_strategy", str(strategy),
                                "--src_ckpt_dir", str(src), "--dst_ckpt_dir", str(tmp_path / "o")]) == 2
    assert "slicing a complete checkpoint needs --src_ckpt_strategy" in capsys.readouterr().err
    assert ms_transform == {"merge": [], "transform": []}


def _training_state(src: Path, with_meta: bool) -> None:
    import mindspore as ms

    from glm.checkpoint import save_atomic

    for rank in (0, 1):
        items = [{"name": k, "data": ms.Tensor(v)} for k, v in _params(0).items()]
        items += [{"name": f"adam_{m}.embedding.weight", "data": ms.Tensor(np.zeros((8, 4), np.float32))}
                  for m in "mv"]
        path = src / f"rank_{rank}" / f"glm_rank_{rank}-1_4.ckpt"
        if with_meta:
            save_atomic(items, path, {"kind": "train_state", "global_step": 4})
        else:
            _save(path, {i["name"]: i["data"].asnumpy() for i in items})


@pytest.mark.parametrize("with_meta, strategy", [(True, False), (False, False), (True, True)])
def test_training_state_checkpoints_are_refused(tmp_path: Path, ms_transform: dict, capsys: pytest.CaptureFixture,
                                                with_meta: bool, strategy: bool) -> None:
    src = tmp_path / "output" / "checkpoint"
    _training_state(src, with_meta)
    argv = ["--src_ckpt_dir", str(src), "--dst_ckpt_dir", str(tmp_path / "o")]
    if strategy:
        (tmp_path / "output" / "strategy").mkdir()
        argv += ["--src_ckpt_strategy", str(tmp_path / "output" / "strategy")]
    assert transform_ckpt.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "glm_rank_0-1_4.ckpt is a training-state checkpoint" in err and len(err.splitlines()) == 1
    assert f"--src_ckpt_dir {tmp_path / 'output' / 'checkpoint_network'}" in err
    assert ms_transform == {"merge": [], "transform": []} and not (tmp_path / "o").exists()
