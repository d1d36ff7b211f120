"""Never lose or mix a user's work, end to end through run_glm.py (issue 11): checkpoints belong to their run,
one writer per output folder, no debris after a kill or a full disk, environment faults as one-line errors.
Each run is the tiny model for 2-6 steps."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from cli_utils import FAST, REPO, TINY2, run_glm

pytestmark = pytest.mark.slow
TINY3 = "configs/glm3/run_glm3_tiny.yaml"
SAVE2 = ["callbacks.CheckpointMonitor.save_checkpoint_steps=2", "callbacks.CheckpointMonitor.keep_checkpoint_max=2"]


def finetune(out, *extra, cfg=TINY2, check=True, cwd=None):
    args = ["--config", cfg, "--run_mode", "finetune", "--load_checkpoint", "random", *FAST, *extra]
    if out is not None:
        args += ["--output_dir", str(out)]
    if cwd is None:
        return run_glm(*args, check=check)
    proc = subprocess.run([sys.executable, str(REPO / "run_glm.py"), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)
    assert not check or proc.returncode == 0, proc.stderr[-3000:]
    return proc


def faulty(mode: str, when: int, *args) -> list[str]:
    return [sys.executable, str(REPO / "tests" / "fault_inject.py"), mode, str(when), *args]


def ckpts(out, rank=0):
    return sorted(p.name for p in (Path(out) / "checkpoint" / f"rank_{rank}").glob("*.ckpt"))


def debris(out) -> list[str]:
    return sorted(str(p.relative_to(out)) for p in Path(out).rglob(".*"))


def error_line(proc) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and not ln.startswith(("warning: ", "[WARNING]"))]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "internal error" not in lines[0], proc.stderr
    return lines[0]


def test_runs_keep_their_own_checkpoints_and_resume_picks_their_own(tmp_path):
    """The shipped GLM2 and GLM3 tiny configs (their own output folders) back to back; a shorter second GLM2 run
    into the same folder (the 20-then-10-step case, scaled to 4-then-2) keeps its checkpoints and the first
    run's, and `--resume_training` picks the newest run; a checkpoint of the other model is refused."""
    (tmp_path / "data").symlink_to(REPO / "data")
    cfg2, cfg3 = str(REPO / TINY2), str(REPO / TINY3)
    g2, g3 = tmp_path / "output" / "glm2-tiny", tmp_path / "output" / "glm3-tiny"
    finetune(None, "--max_steps", "4", *SAVE2, cfg=cfg2, cwd=tmp_path)
    finetune(None, "--max_steps", "2", *SAVE2, cfg=cfg3, cwd=tmp_path)
    first = ["glm2-tiny_rank_0-1_2.ckpt", "glm2-tiny_rank_0-1_4.ckpt"]
    assert ckpts(g2) == first and ckpts(g3) == ["glm3-tiny_rank_0-1_2.ckpt"]

    proc = finetune(None, "--max_steps", "2", *SAVE2, cfg=cfg2, cwd=tmp_path)   # a shorter run, same folder
    assert "this run names its own glm2-tiny_1_rank_*.ckpt" in proc.stdout
    assert ckpts(g2) == sorted(first + ["glm2-tiny_1_rank_0-1_2.ckpt"])
    summary = json.loads((g2 / "train_summary.json").read_text())
    assert Path(summary["last_checkpoint"]).name == "glm2-tiny_1_rank_0-1_2.ckpt"
    assert (tmp_path / summary["last_checkpoint"]).is_file() and (tmp_path / summary["weights"]).is_file()
    assert sorted(p.name for p in (g2 / "checkpoint_network" / "rank_0").iterdir()) == \
        ["glm2-tiny_1_rank_0-network.ckpt", "glm2-tiny_rank_0-network.ckpt"]

    proc = finetune(None, "--max_steps", "4", "--resume_training", *SAVE2, cfg=cfg2, cwd=tmp_path)
    assert f"resumed from {Path('output/glm2-tiny/checkpoint/rank_0/glm2-tiny_1_rank_0-1_2.ckpt')} at step 2" \
        in proc.stdout
    assert ckpts(g2) == sorted(first + ["glm2-tiny_1_rank_0-1_2.ckpt", "glm2-tiny_1_rank_0-1_4.ckpt"])
    proc = finetune(None, "--max_steps", "3", "--resume_training", *SAVE2, cfg=cfg3, cwd=tmp_path)
    assert f"resumed from {Path('output/glm3-tiny/checkpoint/rank_0/glm3-tiny_rank_0-1_2.ckpt')} at step 2" \
        in proc.stdout
    assert ckpts(g3) == ["glm3-tiny_rank_0-1_2.ckpt", "glm3-tiny_rank_0-1_3.ckpt"]

    wrong = g2 / "checkpoint" / "rank_0" / "glm2-tiny_rank_0-1_4.ckpt"   # the other model's, named explicitly
    err = error_line(finetune(None, "--resume_training", str(wrong), cfg=cfg3, cwd=tmp_path, check=False))
    assert f"--resume_training {wrong}: that run had another model or tokenizer (tokenizer 'ChatGLM2Tokenizer' vs " \
           "'ChatGLM3Tokenizer'" in err
    assert debris(g2) == [] and debris(g3) == []


def test_concurrent_run_refused_and_kill_during_checkpoint_write_leaves_nothing(tmp_path):
    out = tmp_path / "out"
    args = ["--config", TINY2, "--run_mode", "finetune", "--load_checkpoint", "random", "--output_dir", str(out),
            *FAST, "--max_steps", "4", *SAVE2]
    holder = subprocess.Popen(faulty("hang", 1, *args), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)
    try:
        line = ""
        while not line.startswith("HANGING"):   # inside its first checkpoint write, half a file on disk
            line = holder.stdout.readline()
            assert line or holder.poll() is None, holder.stderr.read()[-2000:]
        second = finetune(out, "--max_steps", "2", check=False)
        err = error_line(second)
        assert f"error: output_dir {out} is in use by another run (pid {holder.pid} on " in err and "finetune" in err
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    left = debris(out)
    assert any(".partial-" in name and name.endswith(".tmp") for name in left), left   # what a kill leaves
    assert ".glm-launcher.lock" in left
    proc = finetune(out, "--max_steps", "2", "--resume_training", *SAVE2)
    assert f"took over the lock of {out} left by an earlier run (pid {holder.pid}" in proc.stderr
    assert "no longer running" in proc.stderr and "a temporary file left by a killed run" in proc.stdout
    assert debris(out) == [] and ckpts(out) == ["glm2-tiny_rank_0-1_2.ckpt"]


def _can_mount() -> bool:
    probe = Path("/tmp") / f"h11-probe-{os.getpid()}"
    probe.mkdir(exist_ok=True)
    ok = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(probe)], capture_output=True).returncode == 0
    if ok:
        subprocess.run(["umount", str(probe)], capture_output=True)
    probe.rmdir()
    return ok


def test_full_disk_is_one_line_no_temp_left_and_previous_checkpoint_loadable(tmp_path):
    """A real 14 MB tmpfs where the machine allows mounting one (the 9.6 MB checkpoint fits once, not twice),
    else an injected ENOSPC at the second checkpoint write."""
    out = tmp_path / "disk"
    args = ["--config", TINY2, "--run_mode", "finetune", "--load_checkpoint", "random", "--output_dir", str(out),
            *FAST, "--max_steps", "4", "callbacks.CheckpointMonitor.save_checkpoint_steps=2",
            "callbacks.CheckpointMonitor.keep_checkpoint_max=1"]
    mounted = _can_mount()
    if mounted:
        out.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=14m", "tmpfs", str(out)], check=True)
        cmd = [sys.executable, str(REPO / "run_glm.py"), *args]
    else:
        cmd = faulty("enospc", 2, *args)
    try:
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
        err = error_line(proc)
        target = out / "checkpoint" / "rank_0" / "glm2-tiny_rank_0-1_4.ckpt"
        assert err.startswith(f"error: {target}: no space left on device (needs about ") and " free)" in err, err
        assert "CRITICAL" not in proc.stderr
        assert debris(out) == [] and ckpts(out) == ["glm2-tiny_rank_0-1_2.ckpt"]
        from glm.checkpoint import load_state

        params, meta = load_state(out / "checkpoint" / "rank_0" / "glm2-tiny_rank_0-1_2.ckpt")
        assert meta["global_step"] == 2 and meta["fingerprint"]["fields"]["num_layers"] == 2
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(out)], capture_output=True)


def cli(capsys, *args) -> str:
    """run_glm.py in this process (for errors raised before any model is built): the one stderr line."""
    from glm.cli import run_glm_main

    with pytest.raises(SystemExit) as e:
        run_glm_main(list(args))
    assert e.value.code == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(lines) == 1, lines
    return lines[0]


def test_environment_faults_exit_2_with_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    afile = tmp_path / "output"
    afile.write_text("I am a file")
    base = ["--config", TINY2, "--run_mode", "finetune", "--load_checkpoint", "random"]
    assert cli(capsys, *base, "--output_dir", str(afile)) == f"error: {afile}: is a file, not a folder"
    if not _can_mount():
        pytest.skip("read-only case needs a read-only mount (the glm.io unit test injects it)")
    ro = tmp_path / "ro"
    ro.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,ro", "tmpfs", str(ro)], check=True)
    try:
        err = cli(capsys, *base, "--output_dir", str(ro / "out"))
        assert err.startswith(f"error: {ro / 'out'}: the file system is read-only")
    finally:
        subprocess.run(["umount", "-l", str(ro)], capture_output=True)
