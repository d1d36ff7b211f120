"""run_glm.py train/finetune end to end on the tiny config: loss, checkpoints, exact resume, LoRA,
gradient accumulation. Each test drives the CLI in a subprocess, as a user would."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from cli_utils import FAST, REPO, TINY2, TINY2_LORA, max_diff, read_ckpt, run_glm

pytestmark = pytest.mark.slow


def ckpts(out, rank=0):
    return sorted(p.name for p in (out / "checkpoint" / f"rank_{rank}").glob("*.ckpt"))


def final_weights(out, kind="network"):
    return read_ckpt(next((out / "checkpoint_network" / "rank_0").glob(f"*-{kind}.ckpt")))


def losses(out):
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def finetune(out, *extra, cfg=TINY2):
    return run_glm("--config", cfg, "--run_mode", "finetune", "--load_checkpoint", "random",
                   "--output_dir", str(out), *FAST, *extra)


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """8 uninterrupted steps, checkpoints every 2 steps, keep 3."""
    out = tmp_path_factory.mktemp("base")
    finetune(out, "--max_steps", "8", "callbacks.CheckpointMonitor.save_checkpoint_steps=2", "callbacks.CheckpointMonitor.keep_checkpoint_max=3")
    return out


def test_loss_falls_and_checkpoints_are_rotated(base_run):
    values = losses(base_run)
    assert len(values) == 8
    assert np.mean(values[-3:]) < np.mean(values[:3]) - 0.3
    # 4 saves (steps 2, 4, 6, 8), keep_checkpoint_max 3: the oldest was deleted.
    assert ckpts(base_run) == [f"glm2-tiny_rank_0-1_{s}.ckpt" for s in (4, 6, 8)]
    assert not [p for p in (base_run / "checkpoint" / "rank_0").iterdir() if p.name.startswith(".")]
    summary = json.loads((base_run / "train_summary.json").read_text())
    assert summary["steps"] == 8 and summary["final_loss"] == pytest.approx(values[-1], abs=1e-6)
    assert (base_run / "config.resolved.yaml").is_file()
    assert json.loads((base_run / "data_stats.json").read_text())["samples"] == 300


def test_data_stats_json_has_truncation_counts_and_percentiles(base_run):
    """data_stats.json of the run = the train block's stats, recomputed here from raw sentencepiece calls."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(REPO / "data/sample/tokenizer.model"))
    rows = [json.loads(line) for line in (REPO / "data/sample/train.json").read_text(encoding="utf-8").splitlines()]
    src = np.array([2 + len(sp.encode(f"[Round 1]\n\n问：{r['content']}\n\n答：")) for r in rows])   # + [gMASK] sop
    tgt = np.array([len(sp.encode(r["summary"])) for r in rows])
    stats = json.loads((base_run / "data_stats.json").read_text())
    assert (stats["phase"], stats["version"], stats["max_source_length"], stats["max_target_length"]) == ("train", 2, 48, 79)
    assert stats["lines_read"] == stats["samples"] == 300 and sum(stats["skipped"].values()) == 0
    assert stats["truncated_source"] == int((src > 48).sum()) and stats["truncated_target"] == int((tgt > 79).sum())
    for key, lengths in (("source_tokens", src), ("target_tokens", tgt)):
        p50, p90, p99 = np.percentile(lengths, [50, 90, 99])
        assert stats[key] == {"p50": int(p50), "p90": int(p90), "p99": int(p99), "max": int(lengths.max())}
    assert stats["source_tokens"]["p50"] > 20 and stats["target_tokens"]["max"] > 10
    assert not [f for f in base_run.iterdir() if f.name.startswith(".")]     # written via temp name + rename


def test_stop_and_resume_equals_uninterrupted(base_run, tmp_path):
    out = tmp_path / "split"
    finetune(out, "--max_steps", "4", "callbacks.CheckpointMonitor.save_checkpoint_steps=2")
    proc = finetune(out, "--max_steps", "8", "--resume_training", "callbacks.CheckpointMonitor.save_checkpoint_steps=2")
    assert "resumed from" in proc.stdout and "at step 4" in proc.stdout
    assert max_diff(final_weights(out), final_weights(base_run)) <= 1e-6
    assert losses(out) == pytest.approx(losses(base_run), abs=1e-5)


def test_sigkill_between_checkpoints_resumes_from_last_complete(base_run, tmp_path):
    out = tmp_path / "killed"
    target = out / "checkpoint" / "rank_0" / "glm2-tiny_rank_0-1_4.ckpt"
    cmd = [sys.executable, str(REPO / "run_glm.py"), "--config", TINY2, "--run_mode", "finetune",
           "--load_checkpoint", "random", "--output_dir", str(out), *FAST, "--max_steps", "8",
           "callbacks.CheckpointMonitor.save_checkpoint_steps=2", "callbacks.CheckpointMonitor.keep_checkpoint_max=3"]
    p = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not target.exists() and p.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert target.exists()
    done = ckpts(out)
    assert "glm2-tiny_rank_0-1_8.ckpt" not in done
    # A half-written file under a final name (e.g. a full disk) must be skipped, never loaded.
    last = out / "checkpoint" / "rank_0" / done[-1]
    step = int(done[-1].rsplit("_", 1)[1].split(".")[0])
    fake = last.with_name(f"glm2-tiny_rank_0-1_{step + 1}.ckpt")
    fake.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    proc = finetune(out, "--max_steps", "8", "--resume_training", "callbacks.CheckpointMonitor.save_checkpoint_steps=2",
                    "callbacks.CheckpointMonitor.keep_checkpoint_max=3")
    assert f"resumed from {last}" in proc.stdout
    assert "skipping unreadable checkpoint" in proc.stderr
    assert max_diff(final_weights(out), final_weights(base_run)) <= 1e-6


def test_gradient_accumulation_2xB_equals_batch_2B(tmp_path):
    a, b = tmp_path / "b4", tmp_path / "b2x2"
    # The config's own warmup (lr 1e-4, 2e-4, 3e-4): the runs differ only in fp32 summation order
    # (one 4-row reduction vs two 2-row ones), which AdamW's normalised update amplifies with the lr.
    finetune(a, "--max_steps", "3", "--batch_size", "4", "lr_schedule.warmup_steps=10")
    finetune(b, "--max_steps", "3", "--batch_size", "2", "--gradient_accumulation_steps", "2",
             "lr_schedule.warmup_steps=10")
    assert losses(a) == pytest.approx(losses(b), abs=1e-5)
    assert max_diff(final_weights(a), final_weights(b)) <= 1e-6


def test_lora_trains_only_adapters_and_merge_matches(base_run, tmp_path):
    out = tmp_path / "lora"
    base = next((base_run / "checkpoint_network" / "rank_0").glob("*-network.ckpt"))
    proc = run_glm("--config", TINY2_LORA, "--run_mode", "finetune", "--load_checkpoint", str(base),
                   "--output_dir", str(out), *FAST, "--max_steps", "4")
    summary = json.loads((out / "train_summary.json").read_text())
    # rank 8 on the fused qkv of 2 layers: 2 * 8 * (128 + 256)
    assert summary["trainable_parameters"] == 2 * 8 * (128 + 2 * 128)
    assert "6,144 trainable" in proc.stdout
    adapter = next((out / "checkpoint_network" / "rank_0").glob("*-adapter.ckpt"))
    saved = read_ckpt(adapter)
    assert sorted(saved) == sorted(f"transformer.encoder.layers.{i}.self_attention.query_key_value.lora_{x}"
                                   for i in range(2) for x in "ab")
    assert np.abs(saved["transformer.encoder.layers.0.self_attention.query_key_value.lora_b"]).max() > 0
    merged = tmp_path / "merged.ckpt"
    subprocess.run([sys.executable, str(REPO / "tools/merge_lora.py"), "--adapter", str(adapter),
                    "--output", str(merged)], check=True, cwd=REPO, capture_output=True)
    # Same logits: base+adapter (LoRA config) vs merged (plain config), via predict's greedy tokens
    # and a direct forward.
    script = f"""
import numpy as np, sys
from glm.config import load_config
from glm.build import build_model, load_checkpoints
from glm.runtime import ms, setup_context
setup_context("CPU", 0)
ids = ms.Tensor(np.random.RandomState(0).randint(3, 900, (2, 40)).astype(np.int32))
a, la = build_model(load_config("{TINY2_LORA}")); load_checkpoints(a, "{adapter}", la, required=True, run_mode="eval")
b, lb = build_model(load_config("{TINY2}")); load_checkpoints(b, "{merged}", lb, required=True, run_mode="eval")
print(float(np.abs(a(ids).asnumpy() - b(ids).asnumpy()).max()))
"""
    diff = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, check=True)
    assert float(diff.stdout.strip().splitlines()[-1]) < 1e-4


def test_dry_run_prints_counts_and_a_masked_sample(tmp_path):
    proc = run_glm("--config", TINY2, "--run_mode", "finetune", "--load_checkpoint", "random", "--dry_run",
                   "--output_dir", str(tmp_path))
    assert "parameters: 887,936 total, 887,936 trainable" in proc.stdout
    assert "x -100, then" in proc.stdout and "+ eos" in proc.stdout
    assert "问：" in proc.stdout and "# resolved config" in proc.stdout
    assert not (tmp_path / "checkpoint").exists()
    shutil.rmtree(tmp_path, ignore_errors=True)
