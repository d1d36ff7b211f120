"""Never lose or mix a user's work (issue 11): atomic writes with no debris, environment faults as one-line
errors, one writer per output folder. The glm.io unit tests here need no model and run in well under a
second; the end-to-end runs are in tests/test_safety_runs.py."""

from __future__ import annotations

import errno
import json
import os
import re
import socket
import subprocess
import sys
import textwrap
from contextlib import contextmanager
from pathlib import Path

import pytest

from glm import GLMError
from glm.io import (
    LOCK_NAME,
    acquire_output_lock,
    atomic_path,
    atomic_write,
    ensure_dir,
    output_lock,
    release_output_lock,
    remove_stale_temps,
    temp_path,
    write_json_atomic,
    write_text_atomic,
)

REPO = Path(__file__).resolve().parents[1]


def debris(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob(".*") if p.name != LOCK_NAME)


@contextmanager
def tmpfs(path: Path, size: str = "64k", options: str = ""):
    """A small real file system (root in a container may mount one); skips the test where it cannot."""
    path.mkdir(parents=True, exist_ok=True)
    opts = f"size={size}" + (f",{options}" if options else "")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip()[:80]}); the injected faults cover this case")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def dead_pid() -> int:
    return int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True, check=True).stdout)


# ---------------------------------------------------------------------------------------- atomic writes
def test_atomic_write_replaces_whole_file_and_leaves_nothing_else(tmp_path):
    dest = tmp_path / "sub" / "metrics.json"
    write_json_atomic({"a": 1, "text": "广告"}, dest)
    assert json.loads(dest.read_text(encoding="utf-8")) == {"a": 1, "text": "广告"}
    assert "广告" in dest.read_text(encoding="utf-8")      # not \\u-escaped
    assert (dest.stat().st_mode & 0o777) == 0o666 & ~_umask()
    write_text_atomic(dest, "second\n")
    assert dest.read_text() == "second\n" and debris(tmp_path) == []


def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m


def test_error_inside_the_block_keeps_the_old_file_and_removes_the_temp(tmp_path):
    dest = tmp_path / "predictions.jsonl"
    dest.write_text("old\n")
    with pytest.raises(ValueError), atomic_write(dest) as f:
        f.write("half of the new")
        raise ValueError("writer failed")
    assert dest.read_text() == "old\n" and debris(tmp_path) == []


def test_mindspore_inner_tmp_is_removed_on_error(tmp_path):
    """MindSpore's save_checkpoint writes `<name>.tmp` before renaming to the name it was given."""
    dest = tmp_path / "glm_rank_0-1_2.ckpt"
    with pytest.raises(RuntimeError), atomic_path(dest) as tmp:
        assert tmp.name.startswith(".glm_rank_0-1_2.partial-") and tmp.suffix == ".ckpt"
        tmp.with_suffix(".tmp").write_bytes(b"x" * 100)
        raise RuntimeError("killed mid-write")
    assert debris(tmp_path) == [] and not dest.exists()


def test_injected_enospc_is_one_line_naming_the_path_and_space(tmp_path):
    dest = tmp_path / "ckpt" / "model.ckpt"
    dest.parent.mkdir()
    dest.write_bytes(b"previous good checkpoint")
    with pytest.raises(GLMError) as e, atomic_path(dest, needed=9_600_000) as tmp:
        tmp.write_bytes(b"x" * 1000)
        raise OSError(errno.ENOSPC, "No space left on device")
    msg = str(e.value)
    assert msg.startswith(f"{dest}: no space left on device (needs about 9.2 MB, ") and "free" in msg
    assert "\n" not in msg
    assert dest.read_bytes() == b"previous good checkpoint" and debris(tmp_path) == []


def test_real_full_disk_is_one_line_and_leaves_no_temp(tmp_path):
    with tmpfs(tmp_path / "small", "64k") as disk:
        dest = disk / "big.bin"
        with pytest.raises(GLMError) as e, atomic_write(dest, "wb") as f:
            f.write(b"\0" * 1_000_000)
        assert str(e.value).startswith(f"{dest}: no space left on device (needs about ")
        assert os.listdir(disk) == []


def test_read_only_file_system_is_one_line(tmp_path):
    with tmpfs(tmp_path / "ro", "64k", "ro") as disk:
        with pytest.raises(GLMError, match=r"the file system is read-only"):
            write_text_atomic(disk / "metrics.json", "{}")
        with pytest.raises(GLMError, match=r"read-only"):
            acquire_output_lock(disk / "out")


def test_output_dir_that_is_a_file(tmp_path):
    f = tmp_path / "output"
    f.write_text("not a folder")
    with pytest.raises(GLMError, match=r"output: is a file, not a folder"):
        ensure_dir(f)
    with pytest.raises(GLMError, match=rf"{f} is a file, not a folder"):
        write_text_atomic(f / "checkpoint" / "x.json", "{}")


def test_permission_error_is_one_line(tmp_path, monkeypatch):
    def refuse(*a, **k):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(GLMError, match=r"x.json: permission denied"):
        write_text_atomic(tmp_path / "x.json", "{}")
    assert debris(tmp_path) == []


# ---------------------------------------------------------------------------------------- dead writers
def test_stale_temps_of_dead_writers_are_removed_live_and_foreign_kept(tmp_path):
    host, dead = socket.gethostname(), dead_pid()
    ck = tmp_path / "checkpoint" / "rank_0"
    ck.mkdir(parents=True)
    stale = [ck / f".glm_rank_0-1_9.partial-{host}-{dead}.ckpt", ck / f".glm_rank_0-1_9.partial-{host}-{dead}.tmp",
             tmp_path / f".metrics.partial-{host}-{dead}.json", ck / f".glm_rank_0-1_8.partial-{dead}.ckpt"]
    kept = [ck / f".glm_rank_0-1_7.partial-{host}-{os.getpid()}.ckpt",
            ck / f".glm_rank_0-1_6.partial-other-host-{dead}.ckpt", ck / "glm_rank_0-1_5.ckpt"]
    for f in stale + kept:
        f.write_bytes(b"half")
    assert sorted(remove_stale_temps(tmp_path)) == sorted(stale)
    assert all(f.exists() for f in kept) and not any(f.exists() for f in stale)


def test_temp_name_carries_host_pid_and_suffix(tmp_path):
    t = temp_path(tmp_path / "a.safetensors")
    assert t.parent == tmp_path and t.name == f".a.partial-{socket.gethostname()}-{os.getpid()}.safetensors"


# ---------------------------------------------------------------------------------------- output lock
HOLDER = textwrap.dedent("""
    import os, sys
    sys.path.insert(0, {repo!r})
    from glm.io import acquire_output_lock
    acquire_output_lock(sys.argv[1], "train")
    print("locked", flush=True)
    if sys.argv[2] == "die":
        os._exit(0)           # like kill -9: no clean-up
    sys.stdin.readline()
""")


def _holder(out: Path, mode: str) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", HOLDER.format(repo=str(REPO)), str(out), mode],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "locked"
    return p


def test_second_writer_is_refused_naming_the_holder(tmp_path):
    out = tmp_path / "out"
    p = _holder(out, "hold")
    try:
        with pytest.raises(GLMError) as e:
            acquire_output_lock(out)
        msg = str(e.value)
        assert f"output_dir {out} is in use by another run (pid {p.pid} on {socket.gethostname()}" in msg
        assert "train" in msg and "\n" not in msg
    finally:
        p.stdin.close()
        p.wait()
    # released on exit: now it is free
    with output_lock(out):
        assert (out / LOCK_NAME).exists()
    assert not (out / LOCK_NAME).exists()


def test_lock_of_a_dead_process_is_taken_over_with_a_notice(tmp_path, capsys):
    out = tmp_path / "out"
    p = _holder(out, "die")
    p.wait()
    assert json.loads((out / LOCK_NAME).read_text())["pid"] == p.pid
    with output_lock(out):
        assert json.loads((out / LOCK_NAME).read_text())["pid"] == os.getpid()
    err = capsys.readouterr().err
    assert f"took over the lock of {out} left by an earlier run (pid {p.pid}" in err and "no longer running" in err


def test_lock_is_reentrant_within_a_process(tmp_path):
    out = tmp_path / "out"
    acquire_output_lock(out)
    acquire_output_lock(out)
    release_output_lock(out)
    assert (out / LOCK_NAME).exists()
    release_output_lock(out)
    assert not (out / LOCK_NAME).exists()


def test_lock_from_another_host_is_trusted(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / LOCK_NAME).write_text(json.dumps({"host": "node-7", "pid": 1234, "started": 0}))
    with pytest.raises(GLMError, match=rf"pid 1234 on node-7.*if that run is gone, delete {out / LOCK_NAME}"):
        acquire_output_lock(out)


# ---------------------------------------------------------------------------------------- bad inputs (item 5)
TINY2 = "configs/glm2/run_glm2_tiny.yaml"
TINY2_LORA = "configs/glm2/run_glm2_tiny_lora.yaml"


def cli_error(capsys, *args) -> str:
    """run_glm.py in this process: exit 2 and exactly one stderr line (warnings aside); returns it."""
    from glm.cli import run_glm_main

    with pytest.raises(SystemExit) as e:
        run_glm_main([str(a) for a in args])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("warning: ")]
    assert e.value.code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    assert "internal error" not in lines[0]
    return lines[0]


@pytest.mark.parametrize("mode", ["finetune", "eval", "predict", "finetune --dry_run", "predict --dry_run"])
def test_tokenizer_larger_than_padded_vocab_is_refused_before_any_graph(mode, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    mode, *extra = mode.split()
    extra += ["--predict_data", "hi"] if mode == "predict" else []
    err = cli_error(capsys, "--config", TINY2, "--run_mode", mode, "--load_checkpoint", "random",
                    "--output_dir", tmp_path, "model.model_config.padded_vocab_size=100", *extra)
    assert "ids but model.model_config.padded_vocab_size is 100; use the model's own tokenizer" in err
    assert "data/sample/tokenizer.model" in err


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory):
    """A base checkpoint of the tiny model and a full (non-adapter) checkpoint of another model."""
    from glm.build import build_model
    from glm.config import load_config
    from glm.weights import write_ms_checkpoint

    d = tmp_path_factory.mktemp("weights")
    model, _ = build_model(load_config(str(REPO / TINY2)))
    state = {n: p.asnumpy() for n, p in model.parameters_and_names() if not n.endswith("_cache")}
    write_ms_checkpoint(state, d / "base.ckpt")
    write_ms_checkpoint(state, d / "full.ckpt")
    return d


def _lora_model():
    from glm.build import build_model
    from glm.config import load_config

    return build_model(load_config(str(REPO / TINY2_LORA)))


def test_full_checkpoint_as_adapter_half_is_refused(tiny_weights):
    from glm.build import load_checkpoints

    model, lora = _lora_model()
    with pytest.raises(GLMError) as e:
        load_checkpoints(model, f"{tiny_weights / 'base.ckpt'},{tiny_weights / 'full.ckpt'}", lora, required=True,
                         run_mode="finetune")
    assert str(e.value) == (f"checkpoint {tiny_weights / 'full.ckpt'}: holds none of the model's 4 adapter weights "
                            "(a full model checkpoint as the adapter half of 'base,adapter'?); give the *-adapter.ckpt "
                            "a LoRA or P-Tuning run saved")


def test_lora_notice_only_when_adapter_weights_are_missing(tiny_weights, capsys):
    from glm.build import load_checkpoints
    from glm.weights import write_ms_checkpoint

    model, lora = _lora_model()
    base = str(tiny_weights / "base.ckpt")
    load_checkpoints(model, base, lora, required=True, run_mode="finetune")   # the normal LoRA start
    assert capsys.readouterr().err == ""
    load_checkpoints(model, base, lora, required=True, run_mode="eval")
    err = capsys.readouterr().err
    assert err.startswith("warning: no adapter loaded: --run_mode eval runs the adapters as initialised")
    lora_state = {n: p.asnumpy() for n, p in model.parameters_and_names() if ".lora_" in n}
    half = dict(list(lora_state.items())[: len(lora_state) // 2])
    write_ms_checkpoint(half, tiny_weights / "half_adapter.ckpt")
    with pytest.raises(GLMError, match=rf"half_adapter.ckpt: {len(lora_state) - len(half)} model parameter\(s\) missing"):
        load_checkpoints(model, f"{base},{tiny_weights / 'half_adapter.ckpt'}", lora, required=True, run_mode="eval")


def test_predict_data_naming_a_missing_file_is_refused(tmp_path):
    from glm.predict import read_prompts

    for name in ("/no/such/prompts.txt", "prompts.jsonl", str(tmp_path / "p.json")):
        with pytest.raises(GLMError, match=rf"--predict_data {re.escape(name)}: no such file"):
            read_prompts([name])
    assert read_prompts(["写一段 summary.txt 的介绍"]) == ["写一段 summary.txt 的介绍"]   # a sentence stays a prompt
    (tmp_path / "p.txt").write_text("a\nb\n", encoding="utf-8")
    assert read_prompts([str(tmp_path / "p.txt")]) == ["a", "b"]


def test_generation_never_picks_ids_beyond_the_tokenizer():
    """Random weights rank the head's padding rows as high as any: with vocab_size set, neither the host path
    (sampling) nor the in-graph greedy chunks may return such an id."""
    import numpy as np

    from glm.generate import GenerationConfig, Generator
    from glm.model.config import GLMConfig
    from glm.model.glm import GLMForCausalLM
    from glm.runtime import ms, setup_context

    setup_context("CPU", 0)
    ms.set_seed(3)
    cfg = GLMConfig(num_layers=2, hidden_size=64, num_attention_heads=4, kv_channels=16, multi_query_group_num=2,
                    ffn_hidden_size=96, padded_vocab_size=160, seq_length=48, use_past=True, batch_size=2)
    model = GLMForCausalLM(cfg)
    rng = np.random.default_rng(0)
    for p in model.get_parameters():
        if len(p.shape) > 1:
            p.set_data(ms.Tensor(rng.normal(0, 0.2, p.shape).astype(np.float32)))
    g = Generator(model, use_cache=True)
    assert g.decode_chunk > 1
    prompts = [[5, 9, 11, 3], [7, 8]]
    free = g.generate(prompts, GenerationConfig(max_new_tokens=24, eos_token_id=[-1]))
    assert max(max(r) for r in free) >= 40   # without the limit, ids above 40 do come out
    for kw in ({}, {"do_sample": True, "temperature": 2.0, "seed": 5}, {"repetition_penalty": 1.3}):
        out = g.generate(prompts, GenerationConfig(max_new_tokens=24, eos_token_id=[-1], vocab_size=40, **kw))
        assert all(len(r) == 24 for r in out) and max(max(r) for r in out) < 40, kw


def test_wrong_value_types_are_named(tmp_path):
    from glm.data import read_jsonl

    path = tmp_path / "train.json"
    path.write_text('{"content": "类型#裙", "summary": "好看"}\n{"content": 123, "summary": "x"}\n'
                    '{"content": "类型#裤", "summary": ["a"]}\n', encoding="utf-8")
    records, counts = read_jsonl(path)
    assert len(records) == 1 and counts["skipped"]["wrong_type"] == 2 and counts["skipped"]["empty_value"] == 0
    with pytest.raises(GLMError, match=r"line 3: 'summary' is a list \(\['a'\]\), expected text"):
        read_jsonl(path, require_answer=True)


def test_fifo_dataset_is_refused_before_reading(tmp_path):
    from glm.data import read_jsonl

    fifo = tmp_path / "train.json"
    os.mkfifo(fifo)
    with pytest.raises(GLMError, match=r"is not a regular file \(a FIFO, socket or device\)"):
        read_jsonl(fifo)   # would block forever if it were opened


def test_torch_unpickling_errors_are_one_line(tmp_path, capsys):
    import pickle

    from glm.weights import read_weights

    bad = tmp_path / "pytorch_model.bin"
    bad.write_bytes(pickle.dumps({"w": socket.socket}, protocol=4))
    with pytest.raises(GLMError) as e:
        read_weights(bad)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{bad}: cannot be read as a PyTorch weights file (UnpicklingError: ")
    assert capsys.readouterr().err == ""   # no torch warnings
    import torch

    torch.save([1, 2], bad)
    with pytest.raises(GLMError, match=r"holds a pickled list, not a state dict of tensors"):
        read_weights(bad)


def test_failed_eval_never_leaves_an_old_metrics_json(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    (tmp_path / "metrics.json").write_text('{"rouge-1": 99.0}')
    err = cli_error(capsys, "--config", TINY2, "--run_mode", "eval", "--load_checkpoint", tmp_path / "gone.ckpt",
                    "--output_dir", tmp_path)
    assert "gone.ckpt does not exist" in err
    assert not (tmp_path / "metrics.json").exists()
