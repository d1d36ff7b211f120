"""run_glm.py train/finetune end to end on the tiny config: loss, checkpoints, exact resume, LoRA,
gradient accumulation. Each test drives the CLI in a subprocess, as a user would."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest
from cli_utils import FAST, REPO, TINY2, TINY2_LORA, max_diff, read_ckpt, run_glm
from fault_inject import sigkill_when_written

pytestmark = pytest.mark.slow


def ckpts(out, rank=0):
    return sorted(p.name for p in (out / "checkpoint" / f"rank_{rank}").glob("*.ckpt"))


def final_weights(out, kind="network"):
    return read_ckpt(next((out / "checkpoint_network" / "rank_0").glob(f"*-{kind}.ckpt")))


def losses(out):
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def records(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def finetune(out, *extra, cfg=TINY2, check=True):
    return run_glm("--config", cfg, "--run_mode", "finetune", "--load_checkpoint", "random",
                   "--output_dir", str(out), *FAST, *extra, check=check)


def error_line(proc) -> str:
    """The single `error:` line of a failed run (anything else on stderr may only be warnings)."""
    assert proc.returncode != 0, proc.stdout[-2000:]
    assert "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and not ln.startswith(("warning: ", "[WARNING]"))]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "internal error" not in lines[0], proc.stderr
    return lines[0]


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    """The first lines of the sample data, so that an epoch is a few steps: {n_lines: path}. Packed
    (train_dataset.packing, on by default) two samples share a row: 24 lines are 12 rows, 3 batches of 4."""
    d = tmp_path_factory.mktemp("data")
    lines = (REPO / "data/sample/train.json").read_text(encoding="utf-8").splitlines(keepends=True)
    paths = {}
    for n in (12, 24, 48):
        paths[n] = d / f"train{n}.json"
        paths[n].write_text("".join(lines[:n]), encoding="utf-8")
    return {n: str(path) for n, path in paths.items()}


def plant_partials(directory):
    """Temporary checkpoint files as a SIGKILLed writer leaves them: one of a dead PID, one of a live one."""
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    dead_file = directory / f".glm_rank_0-1_9.partial-{socket.gethostname()}-{int(dead.stdout)}.ckpt"
    legacy_dead = directory / f".glm_rank_0-1_8.partial-{int(dead.stdout)}.ckpt"
    live_file = directory / f".glm_rank_0-1_7.partial-{socket.gethostname()}-{os.getpid()}.ckpt"
    other_host = directory / f".glm_rank_0-1_6.partial-some-other-host-{int(dead.stdout)}.ckpt"
    for f in (dead_file, legacy_dead, live_file, other_host):
        f.write_bytes(b"half a checkpoint")
    return [dead_file, legacy_dead], [live_file, other_host]


@pytest.fixture(scope="module")
def base_run(tiny_run):
    """8 uninterrupted steps, checkpoints every 2 steps, keep 3 (the shared session run: read-only)."""
    return tiny_run.out


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
    # packing (on by default): every sample is min(src, 48) + min(tgt, 79) + eos tokens of a 128-wide row
    tokens = int((np.minimum(src, 48) + np.minimum(tgt, 79) + 1).sum())
    pack = stats["packing"]
    assert pack["enabled"] and pack["samples"] == 300 and pack["tokens"] == tokens and pack["row_width"] == 128
    assert pack["padding_before"] == pytest.approx(1 - tokens / (300 * 128), abs=1e-4)
    assert pack["padding_after"] == pytest.approx(1 - tokens / (pack["rows"] * 128), abs=1e-4)
    assert pack["rows"] < 200 and pack["padding_after"] < pack["padding_before"] / 2
    assert not [f for f in base_run.iterdir() if f.name.startswith(".")]     # written via temp name + rename


def test_stop_and_resume_equals_uninterrupted(base_run, tmp_path):
    out = tmp_path / "split"
    # The uninterrupted run's schedule spans its 8 steps; --max_steps 4 alone would span 4 (as in HF Trainer).
    finetune(out, "--max_steps", "4", "callbacks.CheckpointMonitor.save_checkpoint_steps=2", "lr_schedule.total_steps=8")
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
    sigkill_when_written(cmd, target, timeout=240)
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
    # with packing on (the default), the same rows, the same label budget K (one graph shape) after the kill
    pack = json.loads((out / "data_stats.json").read_text())["packing"]
    assert pack["enabled"] and f"{pack['samples']} samples packed into {pack['rows']} rows" in proc.stdout
    summary, base = (json.loads((d / "train_summary.json").read_text()) for d in (out, base_run))
    assert summary["label_budget"] == base["label_budget"] and summary["label_budget"] % 16 == 0


def test_gradient_accumulation_2xB_equals_batch_2B(tmp_path):
    a, b = tmp_path / "b4", tmp_path / "b2x2"
    # The config's own warmup (lr 1e-4, 2e-4, 3e-4; total_steps pinned, else --max_steps 3 would squeeze the
    # 10-step warmup into 3 steps): the runs differ only in fp32 summation order (one 4-row reduction vs two
    # 2-row ones), which AdamW's normalised update amplifies with the lr.
    pin = ("lr_schedule.warmup_steps=10", "lr_schedule.total_steps=300")
    finetune(a, "--max_steps", "3", "--batch_size", "4", *pin)
    finetune(b, "--max_steps", "3", "--batch_size", "2", "--gradient_accumulation_steps", "2", *pin)
    assert losses(a) == pytest.approx(losses(b), abs=1e-5)
    assert max_diff(final_weights(a), final_weights(b)) <= 1e-6


def test_lora_trains_only_adapters_and_merge_matches(tiny_lora, tmp_path):
    """tiny_lora: 4 LoRA steps on the 8-step run's weights (shared session run)."""
    summary = tiny_lora.summary
    # rank 8 on the fused qkv of 2 layers: 2 * 8 * (128 + 256)
    assert summary["trainable_parameters"] == 2 * 8 * (128 + 2 * 128)
    assert "6,144 trainable" in tiny_lora.log
    adapter = tiny_lora.weights
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


def test_dry_run_builds_the_model_and_loads_the_checkpoint(base_run, tmp_path):
    base = next((base_run / "checkpoint_network" / "rank_0").glob("*-network.ckpt"))
    proc = run_glm("--config", TINY2, "--run_mode", "finetune", "--load_checkpoint", str(base), "--dry_run",
                   "--output_dir", str(tmp_path))
    assert "parameters: 887,936 total, 887,936 trainable" in proc.stdout
    assert f"load_checkpoint: loaded {base}" in proc.stdout
    assert "x -100, then" in proc.stdout and "+ eos" in proc.stdout
    assert "问：" in proc.stdout and "# resolved config" in proc.stdout
    assert not (tmp_path / "checkpoint").exists()
    shutil.rmtree(tmp_path, ignore_errors=True)


def test_dry_run_counts_lora_and_rejects_a_checkpoint_that_does_not_fit(base_run, tmp_path):
    """The counts are the built model's (LoRA adapters included), and the checkpoint is really loaded:
    base weights of another shape fail in the dry run with the one-line error a real run gives."""
    base = next((base_run / "checkpoint_network" / "rank_0").glob("*-network.ckpt"))
    proc = run_glm("--config", TINY2_LORA, "--run_mode", "finetune", "--load_checkpoint", str(base), "--dry_run",
                   "--output_dir", str(tmp_path), "model.model_config.ffn_hidden_size=256", check=False)
    # 887,936 - 2 layers x 3 x 128 x (344 - 256) + 2 x 8 x (128 + 256) adapters
    assert "parameters: 826,496 total, 6,144 trainable (LoRA)" in proc.stdout
    line = error_line(proc)
    assert proc.returncode == 2
    assert line == (f"error: checkpoint {base}: transformer.encoder.layers.0.mlp.dense_h_to_4h.weight has shape "
                    "(688, 128) but the model expects (512, 128)")


# --------------------------------------------------------------------------------- resume: more cases
def test_fp16_loss_scale_is_checkpointed_and_restored_from_an_older_file_at_an_epoch_end(small_data, tmp_path):
    """fp16 on CPU with dynamic loss scaling; 2 epochs of 3 steps; `--resume_training FILE` from the
    end-of-epoch-1 checkpoint (not the newest) continues exactly, loss scale included. A resumed run
    also removes the temporary files a killed run left (dead PIDs on this host only)."""
    args = ["--train_dataset_dir", small_data[24], "--epochs", "2", "model.model_config.compute_dtype=float16",
            "model.model_config.param_init_type=float16", "runner_wrapper.scale_sense.loss_scale_value=1024",
            "runner_wrapper.scale_sense.scale_window=1", "callbacks.CheckpointMonitor.save_checkpoint_steps=3"]
    a, b = tmp_path / "a", tmp_path / "b"
    finetune(a, *args)
    rec_a = records(a)
    assert [r["step"] for r in rec_a] == [1, 2, 3, 4, 5, 6] and [r["epoch"] for r in rec_a] == [1, 1, 1, 2, 2, 2]
    assert rec_a[-1]["loss"] < rec_a[0]["loss"] - 0.3
    # window 1: the scale doubles after every finite step, halves on an overflow
    scales = [r["loss_scale"] for r in rec_a]
    assert scales[2] != 1024 and len(set(scales)) > 1, scales
    assert ckpts(a) == ["glm2-tiny_rank_0-1_3.ckpt", "glm2-tiny_rank_0-2_3.ckpt"]
    older = read_ckpt(a / "checkpoint" / "rank_0" / "glm2-tiny_rank_0-1_3.ckpt")
    assert float(older["loss_scale.value"]) == scales[2]
    assert older["transformer.embedding.embedding_table"].dtype == np.float16

    shutil.copytree(a / "checkpoint", b / "checkpoint")
    stale, kept = plant_partials(b / "checkpoint" / "rank_0")
    resume_from = b / "checkpoint" / "rank_0" / "glm2-tiny_rank_0-1_3.ckpt"
    proc = finetune(b, *args, "--resume_training", str(resume_from))
    assert f"resumed from {resume_from} at step 3 (epoch 2, step 0 of the epoch)" in proc.stdout
    rec_b = records(b)
    assert [r["step"] for r in rec_b] == [4, 5, 6]
    assert [r["loss_scale"] for r in rec_b] == scales[3:]          # it would restart from 1024 otherwise
    assert [r["loss"] for r in rec_b] == pytest.approx([r["loss"] for r in rec_a[3:]], abs=1e-6)
    assert max_diff(final_weights(b), final_weights(a)) <= 1e-6
    assert not [f for f in stale if f.exists()] and all(f.exists() for f in kept)
    assert all(f"removed {f}" in proc.stdout for f in stale)


def test_dropout_resume_mid_epoch_with_accumulation_equals_uninterrupted(small_data, tmp_path):
    """LoRA with lora_dropout and hidden_dropout 0.1, gradient accumulation 2, 3 steps per epoch: resuming
    from step 2 (mid-epoch; the resumed run then crosses into epoch 2) gives the uninterrupted run's
    losses and adapter weights — the dropout random state is checkpointed."""
    args = ["--train_dataset_dir", small_data[48], "--epochs", "2", "--gradient_accumulation_steps", "2",
            "model.model_config.pet_config.lora_dropout=0.1", "model.model_config.hidden_dropout=0.1",
            "callbacks.CheckpointMonitor.save_checkpoint_steps=1", "callbacks.CheckpointMonitor.keep_checkpoint_max=6"]
    a, b = tmp_path / "a", tmp_path / "b"
    finetune(a, *args, cfg=TINY2_LORA)
    rec_a = records(a)
    assert [r["epoch"] for r in rec_a] == [1, 1, 1, 2, 2, 2]
    resume_from = "glm2-tiny-lora_rank_0-1_2.ckpt"
    saved = read_ckpt(a / "checkpoint" / "rank_0" / resume_from)
    # 2 steps x 2 micro-batches x 2 layers x (2 hidden + 1 LoRA) dropout calls
    assert int(saved["rng.dropout_counter"][0]) == 24
    shutil.copytree(a / "checkpoint", b / "checkpoint")
    proc = finetune(b, *args, "--resume_training", str(b / "checkpoint" / "rank_0" / resume_from), cfg=TINY2_LORA)
    assert "at step 2 (epoch 1, step 2 of the epoch)" in proc.stdout
    rec_b = records(b)
    assert [(r["step"], r["epoch"]) for r in rec_b] == [(r["step"], r["epoch"]) for r in rec_a[2:]]
    assert [r["loss"] for r in rec_b] == pytest.approx([r["loss"] for r in rec_a[2:]], abs=1e-6)
    adapter_a, adapter_b = final_weights(a, "adapter"), final_weights(b, "adapter")
    assert max_diff(adapter_a, adapter_b) <= 1e-6


# ------------------------------------------------------------------------------------- non-finite loss
def test_nonfinite_loss_stops_with_one_line_naming_the_last_checkpoint(tmp_path):
    out = tmp_path / "nan"
    proc = finetune(out, "--max_steps", "6", "lr_schedule.warmup_steps=0", "lr_schedule.learning_rate=1e12",
                    "callbacks.CheckpointMonitor.save_checkpoint_steps=1", check=False)
    line = error_line(proc)
    assert proc.returncode == 2
    rec = records(out)
    bad = rec[-1]
    assert not np.isfinite(bad["loss"]) and not bad["finite"] and all(np.isfinite(r["loss"]) for r in rec[:-1])
    step = bad["step"]
    assert step >= 2
    last = out / "checkpoint" / "rank_0" / f"glm2-tiny_rank_0-1_{step - 1}.ckpt"
    assert last.is_file()
    assert line.startswith(f"error: step {step}: the loss is nan; training stopped, last good checkpoint: {last}. ")
    assert not (out / "checkpoint_network").exists()       # no final weights from a diverged run
    # output/log/glm.log has what the terminal showed, ending with the same error line
    log = (out / "log" / "glm.log").read_text().splitlines()
    assert log[0].startswith("=== run ") and log[-1] == line
    assert all(ln in log for ln in proc.stdout.splitlines())


def test_nonfinite_gradients_with_a_finite_loss_are_named_as_such():
    """fp32, no loss scaling: a finite loss whose gradients are not (here sqrt'(0)) stops the run with a
    message that says so, not that the loss was non-finite. The train step skips that update."""
    from types import SimpleNamespace

    from glm import GLMError
    from glm.optim import AdamW
    from glm.runtime import ms, setup_context
    from glm.train import Trainer
    from glm.train_step import TrainStep

    setup_context("CPU", 0)

    class Norm(ms.nn.Cell):
        def __init__(self):
            super().__init__()
            self.w = ms.Parameter(ms.Tensor(np.zeros((2, 2), np.float32)), name="nonfinite_test.w")

        def construct(self, x, y, positions=None, segments=None, label_rows=None):   # TrainStep's 5 inputs
            return ms.ops.sqrt(ms.ops.square(self.w * x).sum()) + y.sum()

    model = Norm()
    step = TrainStep(model, AdamW(model.trainable_params()), None, None, 1)
    loss, finite, norm = step.run([(np.ones((2, 2), np.float32), np.zeros(1, np.float32))], [1.0], 0.1, 1)
    assert loss == 0.0 and not finite and not np.isfinite(norm)
    assert np.array_equal(model.w.asnumpy(), np.zeros((2, 2), np.float32))    # update skipped
    trainer = SimpleNamespace(global_step=7, loss_scale=None, last_checkpoint=None)
    with pytest.raises(GLMError) as err:
        Trainer._check_finite(trainer, loss, finite, norm)
    msg = str(err.value)
    assert msg.startswith("step 7: the gradients are non-finite (grad norm nan) although the loss is finite (0)")
    assert "no checkpoint was saved before this step" in msg and "loss is nan" not in msg
    # With loss scaling an overflow only skips the step and lowers the scale; a non-finite loss stops.
    Trainer._check_finite(SimpleNamespace(global_step=7, loss_scale=object(), last_checkpoint=None), 1.0, False,
                          float("inf"))
    with pytest.raises(GLMError, match=r"step 7: the loss is inf; .*last good checkpoint: /x/a\.ckpt"):
        Trainer._check_finite(SimpleNamespace(global_step=7, loss_scale=object(), last_checkpoint="/x/a.ckpt"),
                              float("inf"), False, float("inf"))


def test_counted_dropout_masks_are_a_function_of_seed_and_counter():
    """The dropout that replaces nn.Dropout in training: p of the values zeroed, the rest scaled by 1/(1-p);
    a new mask per call; the same mask for the same (seed, rank, counter); identity in eval mode."""
    from glm.dropout import CountedDropout, DropoutState
    from glm.runtime import ms, setup_context

    setup_context("CPU", 0)
    x = ms.Tensor(np.ones((64, 512), np.float32))

    def cell(seed=0, rank=0, start=0):
        state = DropoutState(seed, rank)
        state.counter.set_data(ms.Tensor(np.array([start], np.int64)))
        d = CountedDropout(0.1, state, stream=0)
        d.set_train(True)
        return d, state

    d, state = cell()
    first, second = d(x).asnumpy(), d(x).asnumpy()
    assert state.value() == 2
    for y in (first, second):
        assert np.unique(y) == pytest.approx([0.0, 1 / 0.9], rel=1e-6)
        assert abs((y == 0).mean() - 0.1) < 0.005
    assert (first != second).mean() > 0.1
    assert np.array_equal(cell(start=1)[0](x).asnumpy(), second)          # resumed at counter 1
    assert (cell(seed=1)[0](x).asnumpy() != first).mean() > 0.1
    assert (cell(rank=1)[0](x).asnumpy() != first).mean() > 0.1
    d.set_train(False)
    assert np.array_equal(d(x).asnumpy(), x.asnumpy()) and state.value() == 2
