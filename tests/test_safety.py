"""Never lose or mix a user's work (issue 11): atomic writes with no debris, environment faults as one-line
errors, one writer per output folder. The glm.io unit tests here need no model and run in well under a
second; the end-to-end runs are in tests/test_safety_runs.py."""

from __future__ import annotations

import errno
import json
import os
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
