"""Bad input on the command line (issue 4): every mistake is ONE `error: ...` line on stderr and a non-zero
exit, never a traceback nor click's multi-line usage block; `--help` answers without importing MindSpore."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
from cli_utils import REPO, TINY2, TINY2_LORA, run_glm

pytestmark = pytest.mark.slow

# Lines other tools may add to stderr around our error (our own warnings, MindSpore's log lines).
_NOISE = re.compile(r"^(warning: |\[WARNING\]|\[INFO\])")


def one_line_error(proc, *expected: str) -> str:
    """Assert a failed run printed exactly one `error:` line (and nothing else but warnings); return it."""
    assert proc.returncode != 0, proc.stdout[-2000:]
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and not _NOISE.match(ln)]
    assert len(lines) == 1, proc.stderr
    line = lines[0]
    assert line.startswith("error: "), line
    assert "internal error" not in line, line     # bad input is diagnosed, not a crash caught at the top
    for text in expected:
        assert text in line, line
    return line


def yaml_with(tmp_path: Path, old: str, new: str, src: str = TINY2) -> str:
    text = (REPO / src).read_text(encoding="utf-8")
    assert re.search(old, text, flags=re.M), old
    path = tmp_path / "bad.yaml"
    path.write_text(re.sub(old, new, text, count=1, flags=re.M), encoding="utf-8")
    return str(path)


# ----------------------------------------------------------------------------------------------- --help
def test_help_is_fast_and_never_imports_mindspore(tmp_path):
    # A sitecustomize that makes `import mindspore` fail: --help must not need it.
    (tmp_path / "sitecustomize.py").write_text(
        "import sys\n"
        "class _Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'mindspore' or name.startswith('mindspore.'):\n"
        "            raise ImportError('mindspore is blocked by the test')\n"
        "sys.meta_path.insert(0, _Block())\n")
    t0 = time.perf_counter()
    proc = run_glm("--help", env={"PYTHONPATH": str(tmp_path)})
    seconds = time.perf_counter() - t0
    assert proc.returncode == 0 and proc.stderr == ""
    for flag in ("--config", "--run_mode", "--load_checkpoint", "--predict_data", "--max_steps", "--raw_prompt",
                 "--dry_run", "train|finetune|eval|predict|export|chat"):
        assert flag in proc.stdout
    assert seconds < 8, seconds     # python + click only (MindSpore alone takes several seconds to import)
    # The blocker works: without --help the same environment fails on the import.
    blocked = run_glm("--config", TINY2, "--run_mode", "eval", env={"PYTHONPATH": str(tmp_path)}, check=False)
    assert blocked.returncode != 0 and "mindspore is blocked" in blocked.stderr

    timed = run_glm("-h", env={"PYTHONPROFILEIMPORTTIME": "1"})
    imported = [ln.rsplit("|", 1)[-1].strip() for ln in timed.stderr.splitlines() if ln.startswith("import time:")]
    assert "click" in imported and not [m for m in imported if m.startswith("mindspore")]
    # Only the command definitions (click): no numpy, yaml, launcher, model or config code.
    assert not [m for m in imported if m.startswith(("numpy", "yaml", "glm."))
                and m not in ("glm.cli", "glm.commands")]


# --------------------------------------------------------------------------------------- config mistakes
@pytest.mark.parametrize("args, expected", [
    (["runner_config.epoch=2"], ["override 'runner_config.epoch=2'", "unknown key",
                                 "did you mean 'runner_config.epochs'"]),
    (["runner_config.epochs=two"], ["runner_config.epochs: expected an integer, got 'two'"]),
    (["--epochs", "two"], ["'--epochs'", "'two' is not a valid integer"]),
    (["--batch_size", "0"], ["'--batch_size'", "0 is not in the range"]),
    (["--no_such_flag"], ["No such option", "--no_such_flag"]),
    (["--run_mode", "evaluate"], ["Invalid value for '--run_mode'", "'evaluate' is not one of", "'eval'"]),
], ids=["unknown-key", "wrong-type", "wrong-type-flag", "out-of-range-flag", "unknown-flag", "bad-run-mode"])
def test_bad_flags_and_overrides(args, expected):
    base = ["--config", TINY2] + ([] if "--run_mode" in args else ["--run_mode", "train"])
    proc = run_glm(*base, *args, check=False)
    one_line_error(proc, *expected)
    assert proc.returncode == 2


def test_bad_keys_in_the_yaml_file_name_the_file_and_the_key(tmp_path):
    bad = yaml_with(tmp_path, r"^  epochs: 4.*$", '  epochs: "two"')
    one_line_error(run_glm("--config", bad, "--run_mode", "train", check=False),
                   bad, "runner_config.epochs: expected an integer, got 'two'")
    bad = yaml_with(tmp_path, r"^  sink_mode: False$", "  sink_mode: False\n  epochz: 3")
    one_line_error(run_glm("--config", bad, "--run_mode", "train", check=False),
                   bad, "runner_config.epochz: unknown key", "did you mean 'runner_config.epochs'")
    one_line_error(run_glm("--run_mode", "train", check=False), "Missing option '--config'")
    missing = str(tmp_path / "nope.yaml")
    one_line_error(run_glm("--config", missing, "--run_mode", "train", check=False), missing, "not found")


def test_missing_dataset_and_tokenizer_files(tmp_path):
    nope = str(tmp_path / "nope.json")
    one_line_error(run_glm("--config", TINY2, "--run_mode", "finetune", "--load_checkpoint", "random",
                           "--train_dataset_dir", nope, "--output_dir", str(tmp_path / "o"), check=False),
                   nope, "does not exist")
    vocab = str(tmp_path / "nope.model")
    one_line_error(run_glm("--config", TINY2, "--run_mode", "finetune", "--load_checkpoint", "random",
                           f"train_dataset.tokenizer.vocab_file={vocab}", "--output_dir", str(tmp_path / "o"),
                           check=False),
                   "vocab_file", vocab, "does not exist")
    assert not list((tmp_path / "o").glob("**/*.ckpt"))


def test_finetune_without_a_checkpoint(tmp_path):
    out = tmp_path / "o"
    one_line_error(run_glm("--config", TINY2, "--run_mode", "finetune", "load_checkpoint=", "--max_steps", "1",
                           "--output_dir", str(out), check=False),
                   "--run_mode finetune needs load_checkpoint", "load_checkpoint: random")
    nope = str(tmp_path / "nope.ckpt")
    one_line_error(run_glm("--config", TINY2, "--run_mode", "finetune", "--load_checkpoint", nope, "--max_steps",
                           "1", "--output_dir", str(out), check=False),
                   nope, "does not exist")
    assert not list(out.glob("**/*.ckpt"))


def test_predict_conversations_file_honours_the_prompt_format(tmp_path):
    # A conversations file is encoded with ChatGLM3's role tokens; a run in another format says so instead of
    # quietly encoding it as glm3_chat anyway.
    one_line_error(run_glm("--config", "configs/glm3/run_glm3_tiny_chat.yaml", "--run_mode", "predict",
                           "--load_checkpoint", "random", "--prompt_format", "raw", "--predict_data",
                           "data/sample/chat_dev.json", "--output_dir", str(tmp_path / "o"), check=False),
                   "data/sample/chat_dev.json", "needs the glm3_chat prompt format", "this run uses raw")
    assert not (tmp_path / "o" / "predict_results.jsonl").exists()


@pytest.fixture(scope="module")
def adapter(tiny_lora) -> str:
    """A rank-8 qkv LoRA adapter (the shared session run)."""
    return str(tiny_lora.weights)


@pytest.mark.parametrize("config, overrides, expected", [
    (TINY2_LORA, ["model.model_config.pet_config.lora_rank=4"],
     ["adapter lora_rank is 8 but model.model_config.pet_config.lora_rank is 4"]),
    (TINY2_LORA, ["model.model_config.pet_config.target_modules=.*dense$"],
     ["adapter target_modules is '.*query_key_value.*'", "pet_config.target_modules is '.*dense$'"]),
    (TINY2, [], ["is a LoRA adapter (rank 8)", "no model.model_config.pet_config"]),
], ids=["rank", "targets", "no-pet-config"])
def test_lora_adapter_that_does_not_fit(adapter, tmp_path, config, overrides, expected):
    proc = run_glm("--config", config, "--run_mode", "predict", "--load_checkpoint", adapter, "--predict_data", "hi",
                   "--output_dir", str(tmp_path), *overrides, check=False)
    one_line_error(proc, adapter, *expected)
    assert not (tmp_path / "predict_results.jsonl").exists()


@pytest.mark.parametrize("overrides, expected", [
    (["model.model_config.pet_config.lora_rank=16"],
     ["adapter lora_rank is 8 but model.model_config.pet_config.lora_rank is 16"]),
    (["model.model_config.pet_config.target_modules=.*dense_h_to_4h"],
     ["adapter target_modules is '.*query_key_value.*'", "pet_config.target_modules is '.*dense_h_to_4h'"]),
], ids=["rank", "targets"])
def test_lora_adapter_that_does_not_fit_when_finetuning(adapter, tmp_path, overrides, expected):
    """Continuing to train an adapter under a pet_config it was not made with fails before any step."""
    proc = run_glm("--config", TINY2_LORA, "--run_mode", "finetune", "--load_checkpoint", adapter, "--max_steps", "1",
                   "--output_dir", str(tmp_path), *overrides, check=False)
    one_line_error(proc, adapter, *expected)
    assert proc.returncode == 2
    assert not list(tmp_path.glob("**/*.ckpt")) and not (tmp_path / "metrics.jsonl").exists()


def test_internal_errors_are_one_line_too_unless_debugging(tmp_path):
    """A bug (not bad input) still ends in one line pointing at GLM_DEBUG; GLM_DEBUG=1 shows the traceback."""
    (tmp_path / "sitecustomize.py").write_text(
        "import glm.predict\n"
        "def _boom(*a, **k):\n"
        "    raise RuntimeError('boom\\nsecond line')\n"
        "glm.predict.read_prompts = _boom\n")
    env = {"PYTHONPATH": f"{tmp_path}:{REPO}"}
    args = ("--config", TINY2, "--run_mode", "predict", "--load_checkpoint", "random", "--predict_data", "x",
            "--output_dir", str(tmp_path))
    proc = run_glm(*args, env=env, check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == \
        "error: internal error RuntimeError: boom (set GLM_DEBUG=1 for the traceback)"
    debug = run_glm(*args, env={**env, "GLM_DEBUG": "1"}, check=False)
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "second line" in debug.stderr

