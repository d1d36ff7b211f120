"""Issue 10 items 3-5 end to end on the tiny configs: evaluation during training (eval_metrics.jsonl, the
best checkpoint, early stopping, exact resume after kill -9), max_steps and the LR schedule, and one
prompt format from fine-tuning to eval and predict.

Every run drives `run_glm.py` in a subprocess, as a user would; the expensive runs are module fixtures.
"""

from __future__ import annotations

import functools
import json
import sys

import pytest
from cli_utils import REPO, TINY2, max_diff, read_ckpt
from cli_utils import run_glm as _run_glm
from fault_inject import sigkill_when_written

pytestmark = pytest.mark.slow

TINY3 = "configs/glm3/run_glm3_tiny.yaml"
SCORES = ("rouge-1", "rouge-2", "rouge-l", "bleu-4")


def run_glm(*args: str, **kw):
    """cli_utils.run_glm with room for training + evaluations on a busy machine."""
    return _run_glm(*args, timeout=kw.pop("timeout", 1200), **kw)


def jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def net_dir(out):
    return out / "checkpoint_network" / "rank_0"


@functools.cache
def steps_per_epoch(config: str = TINY2) -> int:
    """Steps of one epoch of a tiny config: its packed rows (train_dataset.packing) per batch."""
    from glm.config import load_config
    from glm.dataset import build_dataset
    from glm.settings import as_run

    run = as_run(load_config(str(REPO / config)))
    return build_dataset(run.train_data, batch_size=run.runner_config.batch_size,
                         pack=run.train_data.packing).num_batches


def train_ckpt(out, prefix: str, step: int, config: str = TINY2):
    steps_per_epoch_ = steps_per_epoch(config)
    epoch = (step - 1) // steps_per_epoch_ + 1
    return out / "checkpoint" / "rank_0" / f"{prefix}_rank_0-{epoch}_{step - (epoch - 1) * steps_per_epoch_}.ckpt"


def replay(evals: list[dict], metric: str, greater: bool, patience: int, threshold: float = 0.0):
    """The best step and the stop step an evaluation log implies (the rules as a user reads them in the docs)."""
    best = best_step = None
    bad = 0
    for r in evals:
        score = r[metric]
        if best is None or (score - best if greater else best - score) > threshold:
            best, best_step, bad = score, r["step"], 0
        else:
            bad += 1
            if patience and bad >= patience:
                return best_step, best, r["step"]
    return best_step, best, None


# ------------------------------------------------------------------------ GLM3, ADGEN, evals at 20/40/60
@pytest.fixture(scope="module")
def glm3_run(tmp_path_factory) -> dict:
    """The tiny GLM3 (version-3 data: `[gMASK] sop <content>`) fine-tuned 60 steps with do_eval every 20
    steps on 4 *training* prompts, best by BLEU-4; checkpoints at every evaluation."""
    tmp = tmp_path_factory.mktemp("glm3")
    lines = (REPO / "data/sample/train.json").read_text(encoding="utf-8").splitlines(keepends=True)
    evalset = tmp / "train4.json"
    evalset.write_text("".join(lines[:4]), encoding="utf-8")
    out = tmp / "out"
    proc = run_glm("--config", TINY3, "--run_mode", "finetune", "--output_dir", str(out), "--max_steps", "60",
                   "--eval_dataset_dir", str(evalset), "do_eval=True", "eval_step_interval=20",
                   "best_metric=bleu-4", "lr_schedule.warmup_steps=2",
                   "callbacks.CheckpointMonitor.save_checkpoint_steps=20",
                   "callbacks.CheckpointMonitor.keep_checkpoint_max=3")
    return {"out": out, "stdout": proc.stdout, "evalset": evalset,
            "prompts": [json.loads(line)["content"] for line in lines[:4]]}


def test_do_eval_logs_loss_and_adgen_scores_at_every_interval(glm3_run):
    out = glm3_run["out"]
    evals = jsonl(out / "eval_metrics.jsonl")
    assert [r["step"] for r in evals] == [20, 40, 60]
    for r in evals:
        assert r["eval_loss"] > 0 and r["eval_perplexity"] == pytest.approx(2.718281828 ** r["eval_loss"], rel=1e-6)
        assert r["eval_samples"] == 4 and r["eval_tokens"] > 0
        assert all(0 <= r[f"eval_{k}"] <= 100 for k in SCORES)
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"] - 0.5          # it is the model being trained
    # The same records are in metrics.jsonl, after the training step they follow, and on the log.
    steps = [r for r in jsonl(out / "metrics.jsonl")]
    at = [i for i, r in enumerate(steps) if "eval_loss" in r]
    assert [steps[i]["step"] for i in at] == [20, 40, 60] and all(steps[i - 1]["step"] == steps[i]["step"] for i in at)
    assert glm3_run["stdout"].count("eval step ") == 3
    assert "lr schedule: polynomial over 60 steps" in glm3_run["stdout"]


def test_best_checkpoint_is_the_best_scoring_step(glm3_run):
    out = glm3_run["out"]
    evals = jsonl(out / "eval_metrics.jsonl")
    step, score, stop = replay(evals, "eval_bleu-4", greater=True, patience=0)
    best = json.loads((out / "best.json").read_text())
    assert (best["step"], best["metric"], best["greater_is_better"]) == (step, "eval_bleu-4", True)
    assert best["score"] == score and stop is None
    bleu = [r["eval_bleu-4"] for r in evals]
    assert [r["is_best"] for r in evals] == [i == 0 or b > max(bleu[:i]) for i, b in enumerate(bleu)]
    # The best file holds the weights of that step (the training checkpoint written at the same step).
    best_ckpt = net_dir(out) / "glm3-tiny_rank_0-best.ckpt"
    assert best["checkpoint"] == str(best_ckpt)
    assert max_diff(read_ckpt(best_ckpt), read_ckpt(train_ckpt(out, "glm3-tiny", step, TINY3))) == 0.0


def test_standalone_eval_of_the_best_checkpoint_gives_the_logged_scores(glm3_run, tmp_path):
    """`--run_mode eval` on the best file reproduces the numbers logged during training, with the prompt
    format recorded in the checkpoint (raw), and without --raw_prompt."""
    out = glm3_run["out"]
    best = json.loads((out / "best.json").read_text())
    proc = run_glm("--config", TINY3, "--run_mode", "eval", "--load_checkpoint", best["checkpoint"],
                   "--output_dir", str(tmp_path), "--eval_dataset_dir", str(glm3_run["evalset"]))
    assert "prompt format: raw" in proc.stdout
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    for k in SCORES:
        assert metrics[k] == pytest.approx(best["eval"][f"eval_{k}"], abs=1e-9)
    glm3_run["eval_predictions"] = [r["prediction"] for r in jsonl(tmp_path / "predictions.jsonl")]


def test_predict_on_training_prompts_gives_the_eval_text(glm3_run, tmp_path):
    """GLM3 fine-tuned on version-3 data: predict uses the checkpoint's format (not <|user|>...<|assistant|>),
    so its answers to training prompts are eval's, with no --raw_prompt."""
    if "eval_predictions" not in glm3_run:
        test_standalone_eval_of_the_best_checkpoint_gives_the_logged_scores(glm3_run, tmp_path / "eval")
    best = json.loads((glm3_run["out"] / "best.json").read_text())
    prompts = glm3_run["prompts"]
    proc = run_glm("--config", TINY3, "--run_mode", "predict", "--load_checkpoint", best["checkpoint"],
                   "--output_dir", str(tmp_path), *[a for p in prompts for a in ("--predict_data", p)])
    assert "prompt format: raw" in proc.stdout and "warning" not in proc.stderr
    answers = [r["response"] for r in jsonl(tmp_path / "predict_results.jsonl")]
    assert answers == glm3_run["eval_predictions"] and any(answers)


def test_server_answers_a_version_3_model_as_predict_does(glm3_run, tmp_path):
    """`--run_mode serve` on the raw-format (version 3) GLM3 checkpoint encodes a chat message as predict does
    (`[gMASK] sop <text>`, not ChatGLM3's role tokens), so the official client gets predict's text."""
    pytest.importorskip("openai")
    from test_serve import Server

    best = json.loads((glm3_run["out"] / "best.json").read_text())["checkpoint"]
    prompts = glm3_run["prompts"][:2]
    run_glm("--config", TINY3, "--run_mode", "predict", "--load_checkpoint", best, "--output_dir",
            str(tmp_path / "predict"), "--batch_size", "1", *[a for p in prompts for a in ("--predict_data", p)])
    expected = [r["response"] for r in jsonl(tmp_path / "predict" / "predict_results.jsonl")]
    srv = Server("--config", TINY3, "--load_checkpoint", best, "--output_dir", str(tmp_path / "serve"))
    try:
        client = srv.client()
        got = [client.chat.completions.create(model=srv.model, messages=[{"role": "user", "content": p}],
                                              temperature=0).choices[0].message.content for p in prompts]
    finally:
        code, err = srv.stop()
    assert "prompt format: raw" in err and "warning" not in err and code == 0, err[-2000:]
    assert got == expected and any(got)


def test_configs_describe_the_version_3_format(glm3_run):
    for name in ("run_glm3_tiny.yaml", "run_glm3_tiny_lora.yaml"):
        text = (REPO / "configs/glm3" / name).read_text(encoding="utf-8")
        line = next(ln for ln in text.splitlines() if ln.strip().startswith("version: 3"))
        assert "<|user|>" not in line and "<|assistant|>" not in line, line


# ------------------------------------------------------------------ early stopping and kill -9 / resume
ES_ARGS = ["--run_mode", "finetune", "--load_checkpoint", "random", "--max_steps", "100", "do_eval=True",
           "eval_step_interval=10", "metric.type=PerplexityMetric", "early_stopping_patience=2",
           "early_stopping_threshold=1.0", "eval_dataset.max_target_length=79", "lr_schedule.warmup_steps=2",
           "callbacks.CheckpointMonitor.save_checkpoint_steps=10", "callbacks.CheckpointMonitor.keep_checkpoint_max=2"]


@pytest.fixture(scope="module")
def early_stop_run(tmp_path_factory) -> dict:
    """The tiny GLM2, evaluated every 10 steps (loss only), stopping after 2 evaluations that do not beat the
    best eval loss by more than 1.0 (the loss falls fast at first, then slower: a stop around step 60)."""
    out = tmp_path_factory.mktemp("es")
    proc = run_glm("--config", TINY2, "--output_dir", str(out), *ES_ARGS)
    return {"out": out, "stdout": proc.stdout}


def test_early_stopping_stops_at_the_expected_step(early_stop_run):
    out = early_stop_run["out"]
    evals = jsonl(out / "eval_metrics.jsonl")
    best_step, best_score, stop = replay(evals, "eval_loss", greater=False, patience=2, threshold=1.0)
    assert stop is not None and stop < 100, [(r["step"], r["eval_loss"]) for r in evals]
    assert evals[-1]["step"] == stop
    train = [r for r in jsonl(out / "metrics.jsonl") if "loss" in r]
    assert train[-1]["step"] == stop                                # no step after the stop
    assert f"early stopping at step {stop}" in early_stop_run["stdout"]
    best = json.loads((out / "best.json").read_text())
    assert (best["step"], best["score"]) == (best_step, best_score)
    # The stop step is saved, and resuming it has nothing to do (one line, exit 0).
    assert train_ckpt(out, "glm2-tiny", stop).is_file()
    again = run_glm("--config", TINY2, "--output_dir", str(out), *ES_ARGS, "--resume_training")
    assert f"nothing to train: the run stopped early at step {stop}" in again.stdout
    assert "early_stopping_patience" in again.stdout


def test_kill_9_and_resume_gives_the_same_best_checkpoint_and_stop_step(early_stop_run, tmp_path):
    ref = early_stop_run["out"]
    evals = jsonl(ref / "eval_metrics.jsonl")
    # Kill right after the checkpoint of the evaluation before the stop (one evaluation of patience left):
    # unless the resumed run remembers both the best score and the used-up patience, it stops elsewhere.
    kill_at, stop = evals[-2]["step"], evals[-1]["step"]
    assert not evals[-2]["is_best"] and evals[-2]["best"]["evals_without_improvement"] == 1
    out = tmp_path / "killed"
    target = train_ckpt(out, "glm2-tiny", kill_at)
    cmd = [sys.executable, str(REPO / "run_glm.py"), "--config", TINY2, "--output_dir", str(out), *ES_ARGS]
    sigkill_when_written(cmd, target, timeout=1200)
    assert target.exists() and not (out / "train_summary.json").exists()
    proc = run_glm("--config", TINY2, "--output_dir", str(out), *ES_ARGS, "--resume_training")
    assert f"at step {kill_at}" in proc.stdout and f"early stopping at step {stop}" in proc.stdout

    def strip(rows):
        return [{k: v for k, v in r.items() if k not in ("eval_time_s", "run_id", "config_hash")} for r in rows]

    assert strip(jsonl(out / "eval_metrics.jsonl")) == strip(evals)    # the killed run's extra lines dropped
    ref_best, best = (json.loads((d / "best.json").read_text()) for d in (ref, out))
    assert (best["step"], best["score"]) == (ref_best["step"], ref_best["score"])
    assert max_diff(read_ckpt(net_dir(out) / "glm2-tiny_rank_0-best.ckpt"),
                    read_ckpt(net_dir(ref) / "glm2-tiny_rank_0-best.ckpt")) <= 1e-6


# ------------------------------------------------------------------------------- max_steps and the schedule
def test_max_steps_shortens_the_schedule_and_a_finished_run_continues_or_says_why_not(tmp_path):
    from glm.optim import LRSchedule

    out = tmp_path / "ms"
    common = ["--config", TINY2, "--run_mode", "finetune", "--load_checkpoint", "random", "--output_dir", str(out),
              "callbacks.CheckpointMonitor.save_checkpoint_steps=1000"]
    proc = run_glm(*common, "--max_steps", "20")
    spe = steps_per_epoch()
    assert f"lr schedule: polynomial over 20 steps (run: max_steps 20 of 4 epochs x {spe} steps = {4 * spe})" \
        in proc.stdout
    lrs = [r["lr"] for r in jsonl(out / "metrics.jsonl")]
    cfg_lr, warmup = 1e-3, 10                                       # configs/glm2/run_glm2_tiny.yaml
    assert len(lrs) == 20
    assert lrs[-1] == pytest.approx(LRSchedule("polynomial", cfg_lr, 20, warmup)(19), rel=1e-12)
    assert lrs[-1] == min(lrs[warmup:]) and lrs[-1] < 0.1 * cfg_lr   # decayed, not 300-step-schedule's 9.7e-4
    assert LRSchedule("polynomial", cfg_lr, 300, warmup)(19) > 0.9 * cfg_lr

    # Same command again: the run is finished; one line says why nothing happens.
    again = run_glm(*common, "--max_steps", "20", "--resume_training")
    assert "nothing to train: the checkpoint is at step 20" in again.stdout and "--max_steps" in again.stdout
    # A larger --max_steps continues it, over a schedule that now spans 25 steps (said in one line).
    more = run_glm(*common, "--max_steps", "25", "--resume_training")
    assert "resume: the lr schedule now spans 25 steps (the checkpoint's run: 20)" in more.stdout
    lrs = [r["lr"] for r in jsonl(out / "metrics.jsonl")]
    assert len(lrs) == 25 and lrs[20] == pytest.approx(LRSchedule("polynomial", cfg_lr, 25, warmup)(20), rel=1e-12)


# ----------------------------------------------------------------------------------- prompt format (unit)
def test_prompt_format_resolution_and_mismatch_warnings():
    from glm.prompt_format import recorded_format, resolve_prompt_format

    warnings: list[str] = []
    assert recorded_format([{"prompt_format": "glm2"}, {"kind": "adapter", "prompt_format": "raw"}]) == "raw"
    assert recorded_format([{}, {"kind": "network"}]) is None
    # No request: the checkpoint's record, else the fallback; neither warns when they agree.
    assert resolve_prompt_format("auto", "raw", "glm3_chat", warn=warnings.append) == "raw"
    assert resolve_prompt_format(None, None, "glm3_chat", warn=warnings.append) == "glm3_chat"
    assert warnings == []
    # A request wins, with a warning naming both formats.
    assert resolve_prompt_format("glm3_chat", "raw", "glm2", warn=warnings.append) == "glm3_chat"
    assert len(warnings) == 1 and "glm3_chat" in warnings[0] and "raw" in warnings[0]
    # An eval block whose version disagrees with the checkpoint: the checkpoint wins, and it is said.
    assert resolve_prompt_format(None, "raw", "glm2", "eval_dataset.data_loader.version 2",
                                 warn=warnings.append) == "raw"
    assert "eval_dataset.data_loader.version 2" in warnings[-1] and "glm2" in warnings[-1]


def test_predict_encodes_a_raw_format_prompt_as_eval_version_3_does():
    """The ids predict feeds a version-3 model are the ids of the eval (and training) prompt."""
    from glm.data import Record, preprocess_eval
    from glm.prompt_format import encode_prompt
    from glm.tokenizer import ChatGLM2Tokenizer, ChatGLM3Tokenizer

    tok = ChatGLM3Tokenizer(REPO / "data/sample/tokenizer.model")
    texts = ["类型#裙*颜色#红色", "类型#上衣*风格#简约*图案#条纹"]
    ev, _ = preprocess_eval(tok, [Record(t, "答", i) for i, t in enumerate(texts)], 48, 8, version=3)
    for text, row in zip(texts, ev["input_ids"]):
        assert encode_prompt(tok, "raw", text) == [int(t) for t in row if t != tok.pad_id]
    ev2, _ = preprocess_eval(tok, [Record(texts[0], "答", 0)], 48, 8, version=2)
    assert encode_prompt(tok, "glm2", texts[0]) == [int(t) for t in ev2["input_ids"][0] if t != tok.pad_id]
    assert encode_prompt(tok, "glm3_chat", texts[0]) == tok.build_chat_input(texts[0])
    with pytest.raises(Exception, match="glm3_chat needs the ChatGLM3 tokenizer"):
        encode_prompt(ChatGLM2Tokenizer(REPO / "data/sample/tokenizer.model"), "glm3_chat", "x")


def test_max_steps_cannot_extend_a_run_past_its_epochs(tmp_path):
    lines = (REPO / "data/sample/train.json").read_text(encoding="utf-8").splitlines(keepends=True)
    data = tmp_path / "train12.json"
    data.write_text("".join(lines[:12]), encoding="utf-8")          # 3 steps per epoch at batch 4
    common = ["--config", TINY2, "--run_mode", "finetune", "--load_checkpoint", "random", "--output_dir",
              str(tmp_path / "out"), "--train_dataset_dir", str(data), "--epochs", "1"]
    run_glm(*common)
    proc = run_glm(*common, "--max_steps", "10", "--resume_training", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    error = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert len(error) == 1 and "max_steps 10" in error[0] and "runner_config.epochs" in error[0], proc.stderr
