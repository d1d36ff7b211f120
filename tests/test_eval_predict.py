"""End to end after a tiny fine-tune (issue 5): `--run_mode eval` (ADGEN scores and perplexity), `predict`
(texts, files, templates, GLM3), `chat` through stdin, and bad input for eval/predict/export.

The CLI runs in subprocesses; the oracle is the same checkpoint loaded in-process (build_model +
load_checkpoints) driven by `Generator` on the tokenizer's own chat template, and a numpy cross-entropy.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from cli_utils import REPO, TINY2, run_glm

pytestmark = pytest.mark.slow

TINY3 = "configs/glm3/run_glm3_tiny.yaml"
DEV = REPO / "data/sample/dev.json"
SCORES = ("rouge-1", "rouge-2", "rouge-l", "bleu-4")
DECODE = "model.model_config.max_decode_length=64"    # predict/chat: prompt + answer <= 64 tokens
STEPS = 30


def one_line_error(proc, *expected: str) -> str:
    assert proc.returncode != 0, proc.stdout[-2000:]
    assert "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and not ln.startswith(("warning: ", "["))]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "internal error" not in lines[0], lines[0]
    for text in expected:
        assert text in lines[0], lines[0]
    return lines[0]


def jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def trained(tiny_trained) -> dict:
    """A 30-step fine-tune of the tiny GLM2 from random weights (loss ~7.5 -> ~3): the shared session run."""
    assert tiny_trained.weights.is_file()
    losses = tiny_trained.losses
    assert len(losses) == STEPS and losses[-1] < losses[0] - 2
    return {"ckpt": str(tiny_trained.weights), "losses": losses}


class Oracle:
    """The trained checkpoint in this process: greedy answers through the tokenizer's template, and the
    per-token loss of train-phase samples."""

    def __init__(self, ckpt: str):
        from glm.build import build_model, load_checkpoints
        from glm.config import apply_overrides, load_config
        from glm.generate import Generator
        from glm.runtime import setup_context

        setup_context("CPU", 0)
        self.cfgs = {c: apply_overrides(load_config(str(REPO / c)), [DECODE]) for c in (TINY2, TINY3)}
        self.model, lora = build_model(self.cfgs[TINY2], use_past=True, batch_size=1)
        load_checkpoints(self.model, ckpt, lora, required=True, run_mode="predict")
        self.generator = Generator(self.model, use_cache=True)
        self._toks = {}

    def tok(self, config: str = TINY2):
        if config not in self._toks:
            from glm.build import build_tokenizer

            self._toks[config] = build_tokenizer(self.cfgs[config])
        return self._toks[config]

    def answer(self, prompt: str, history=None, config: str = TINY2, raw: bool = False, **overrides) -> str:
        tok = self.tok(config)
        ids = tok.encode(prompt) if raw else tok.build_generation_input(prompt, history)
        return self.answer_ids(ids, config, **overrides)

    def answer_ids(self, ids: list[int], config: str = TINY2, **overrides) -> str:
        from glm.build import generation_config

        tok = self.tok(config)
        gen = generation_config(self.cfgs[config], tok, **overrides)
        return tok.decode(self.generator.generate([ids], gen)[0])

    def dev_samples(self, phase: str, max_target_length: int) -> dict:
        from glm.data import load_adgen

        return load_adgen(DEV, self.tok(), phase=phase, version=2, max_source_length=48,
                          max_target_length=max_target_length)[1]

    def token_losses(self, n: int) -> tuple[float, int]:
        """Summed cross-entropy and label count of the first n dev samples, train-phase layout."""
        from glm.runtime import ms

        samples = self.dev_samples("train", 79)
        total, count = 0.0, 0
        for x, y in zip(samples["input_ids"][:n], samples["labels"][:n]):
            logits = self.model(ms.Tensor(x[None])).asnumpy()[0].astype(np.float64)   # [seq, vocab]
            keep = y != -100
            z = logits[keep]
            logp = z - z.max(-1, keepdims=True)
            logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
            total += float(-logp[np.arange(len(z)), y[keep]].sum())
            count += int(keep.sum())
        return total, count


@pytest.fixture(scope="module")
def oracle(trained) -> Oracle:
    return Oracle(trained["ckpt"])


# -------------------------------------------------------------------------------------------------- eval
def test_eval_writes_scores_and_one_prediction_per_sample(trained, oracle, tmp_path):
    from glm.metrics import adgen_scores

    proc = run_glm("--config", TINY2, "--run_mode", "eval", "--load_checkpoint", trained["ckpt"],
                   "--output_dir", str(tmp_path), "eval_dataset.max_eval_samples=8")
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    preds = jsonl(tmp_path / "predictions.jsonl")
    dev = [json.loads(line) for line in DEV.read_text(encoding="utf-8").splitlines()]
    assert len(dev) == 40 and len(preds) == 8 and metrics["samples"] == 8
    assert metrics["checkpoint"] == trained["ckpt"] and metrics["empty_predictions"] == 0
    for i, p in enumerate(preds):
        assert p["line"] == i + 1
        assert p["prompt"] == dev[i]["content"] and p["reference"] == dev[i]["summary"]
        assert isinstance(p["prediction"], str) and p["prediction"].strip()
        assert isinstance(p["new_tokens"], int) and 0 < p["new_tokens"] <= 128
        ours = adgen_scores(p["prediction"], p["reference"])
        for k in SCORES:
            assert p[k] == pytest.approx(ours[k], abs=1e-3)
    for k in SCORES:
        assert 0 <= metrics[k] <= 100
        assert metrics[k] == pytest.approx(np.mean([p[k] for p in preds]), abs=1e-3)
    assert metrics["rouge-1"] > 0 and metrics["rouge-l"] > 0     # 30 steps learn the frequent characters
    # eval generates from the eval block's GLM2-template prompts with the config's eos and limits (batch 4
    # there, one row here).
    tok, ids = oracle.tok(), oracle.dev_samples("eval", 80)["input_ids"]
    for i in range(8):
        prompt = [int(t) for t in ids[i] if t != tok.pad_id]
        assert tok.decode(prompt).startswith("[Round 1]\n\n问：" + preds[i]["prompt"][:10])
        if i == 5:    # row 1 of the second batch
            assert preds[i]["prediction"] == oracle.answer_ids(prompt, max_length=128)
    # The scores are printed too, and the output is in output_dir/log/glm.log under the run's header.
    assert "rouge-1 {:.4f}".format(metrics["rouge-1"]) in proc.stdout
    log = (tmp_path / "log" / "glm.log").read_text(encoding="utf-8")
    assert log.startswith("=== run ") and "(eval, config " in log.splitlines()[0]
    assert all(line in log for line in proc.stdout.splitlines())


def test_eval_prompts_are_the_training_prompts_when_they_fit(oracle):
    tok = oracle.tok()
    train, ev = oracle.dev_samples("train", 79), oracle.dev_samples("eval", 80)
    for x, y, e in zip(train["input_ids"], train["labels"], ev["input_ids"]):
        prompt_len = int(np.argmax(y != -100)) + 1      # labels[t] = input_ids[t + 1]: the answer starts there
        assert [int(t) for t in e if t != tok.pad_id] == x[:prompt_len].tolist()


def test_perplexity_is_exp_of_the_mean_token_loss(trained, oracle, tmp_path):
    # 6 samples at batch 4: the last batch is padded with label-free rows, which must not count.
    # `metric.type: PerplexityMetric` on the eval-phase block (an eval block with `phase: train` takes the
    # same path).
    run_glm("--config", TINY2, "--run_mode", "eval", "--load_checkpoint", trained["ckpt"], "--output_dir",
            str(tmp_path), "eval_dataset.max_eval_samples=6", "eval_dataset.max_target_length=79",
            "metric.type=PerplexityMetric")
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    total, count = oracle.token_losses(6)
    assert metrics["samples"] == 6 and metrics["tokens"] == count
    assert metrics["loss"] == pytest.approx(total / count, rel=1e-4)
    assert metrics["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-3)
    # Same magnitude as the last training losses (dev and train are the same kind of text).
    assert abs(metrics["loss"] - np.mean(trained["losses"][-5:])) < 1.5
    assert not (tmp_path / "predictions.jsonl").exists()


def test_perplexity_on_the_shipped_eval_block_explains_the_length_limit(trained, tmp_path):
    # dev block: 48 + 80 + 1 = 129 tokens do not fit seq_length 128 in the train-phase layout.
    proc = run_glm("--config", TINY2, "--run_mode", "eval", "--load_checkpoint", trained["ckpt"],
                   "--output_dir", str(tmp_path), "metric.type=PerplexityMetric", check=False)
    one_line_error(proc, "seq_length 128", "48 + 80 + 1 = 129")


# ----------------------------------------------------------------------------------------------- predict
def predict(ckpt, out, *args, config=TINY2):
    proc = run_glm("--config", config, "--run_mode", "predict", "--load_checkpoint", ckpt, "--output_dir", str(out),
                   DECODE, *args)
    return proc, jsonl(out / "predict_results.jsonl")


def test_predict_several_texts_through_the_glm2_template(trained, oracle, tmp_path):
    prompts = ["类型#裙*颜色#红色", "你好"]
    proc, results = predict(trained["ckpt"], tmp_path, *[a for p in prompts for a in ("--predict_data", p)])
    assert [r["prompt"] for r in results] == prompts
    for r in results:
        assert r["response"] == oracle.answer(r["prompt"])
        assert r["response"] and 0 < r["new_tokens"] <= 64
        assert f">>> {r['prompt']}\n{r['response']}\n" in proc.stdout
    assert str(tmp_path / "predict_results.jsonl") in proc.stderr
    # --raw_prompt feeds the text as is: a different prompt, a different answer.
    _, raw = predict(trained["ckpt"], tmp_path, "--raw_prompt", *[a for p in prompts for a in ("--predict_data", p)])
    assert [r["response"] for r in raw] == [oracle.answer(p, raw=True) for p in prompts]
    assert [r["response"] for r in raw] != [r["response"] for r in results]


def test_predict_a_txt_file_and_a_jsonl_file(trained, oracle, tmp_path):
    txt = tmp_path / "prompts.txt"
    txt.write_text("类型#裤*风格#简约\n\n   \n你好\n", encoding="utf-8")   # blank lines are skipped
    _, from_txt = predict(trained["ckpt"], tmp_path / "txt", "--predict_data", str(txt))
    assert [r["prompt"] for r in from_txt] == ["类型#裤*风格#简约", "你好"]
    assert from_txt[1]["response"] == oracle.answer("你好")

    js = tmp_path / "prompts.jsonl"
    js.write_text('{"prompt": "类型#裙"}\n"你好"\n\n{"query": "类型#外套", "other": 1}\n', encoding="utf-8")
    _, from_jsonl = predict(trained["ckpt"], tmp_path / "jsonl", "--predict_data", str(js))
    assert [r["prompt"] for r in from_jsonl] == ["类型#裙", "你好", "类型#外套"]
    assert [r["response"] for r in from_jsonl] == [oracle.answer(p) for p in ("类型#裙", "你好", "类型#外套")]


def test_predict_with_the_glm3_config_uses_its_role_template(trained, oracle, tmp_path):
    tok3 = oracle.tok(TINY3)
    assert tok3.build_generation_input("你好")[:3] == tok3.prefix + [tok3.special_tokens["<|user|>"]]
    # One text (the single-prompt form of --predict_data). The checkpoint records the glm2 format it was
    # fine-tuned with; asking for GLM3's role template is honoured with a warning naming both.
    proc, results = predict(trained["ckpt"], tmp_path, "--predict_data", "类型#裙*颜色#红色",
                            "--prompt_format", "glm3_chat", config=TINY3)
    assert "prompt format glm3_chat was requested but the checkpoint was fine-tuned with glm2" in proc.stderr
    assert len(results) == 1 and results[0]["prompt"] == "类型#裙*颜色#红色"
    assert results[0]["response"] == oracle.answer("类型#裙*颜色#红色", config=TINY3)
    assert results[0]["response"] != oracle.answer("类型#裙*颜色#红色")    # not GLM2's template
    assert results[0]["response"] in proc.stdout


# -------------------------------------------------------------------------------------------------- chat
def test_chat_answers_each_turn_reset_clears_history_and_exit_ends(trained, oracle):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, str(REPO / "run_glm.py"), "--config", TINY2, "--run_mode", "chat",
                           "--load_checkpoint", trained["ckpt"]],     # max_decode_length 128: history fits
                          input="你好\n/reset\n再来\n/exit\n", capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    banner, *turns = proc.stdout.split(">>> ")
    assert "/reset" in banner and "/exit" in banner
    assert len(turns) == 4 and turns[-1] == ""      # three inputs answered, then the prompt /exit ended
    first, cleared, second = (t.rstrip("\n") for t in turns[:3])
    assert cleared == "(history cleared)"
    assert first == oracle.answer("你好", max_length=128)
    assert second == oracle.answer("再来", max_length=128)           # no history after /reset ...
    # ... which would have fitted and changed the answer.
    assert second != oracle.answer("再来", history=[("你好", first)], max_length=128)


def test_chat_printer_streams_exactly_the_decoded_answer(oracle):
    """In-process: what chat streams (token by token, byte pieces held back) is the decoded answer."""
    import io

    from glm.build import generation_config
    from glm.chat import _Printer

    tok = oracle.tok()
    out = io.StringIO()
    tokens = oracle.generator.generate([tok.build_generation_input("你好")], generation_config(oracle.cfgs[TINY2], tok),
                                       streamer=_Printer(tok, out))[0]
    assert tokens and out.getvalue() == tok.decode(tokens) == oracle.answer("你好")


def test_chat_drops_old_turns_so_that_each_answer_has_room(oracle, monkeypatch):
    """max_length (max_decode_length 64 here) counts prompt + answer: a history that leaves no room under it
    is trimmed from the oldest turn, instead of answering nothing (or failing) once the chat grows."""
    import io

    import glm.chat
    import glm.predict
    from glm.build import generation_config

    tok = oracle.tok()
    gen = generation_config(oracle.cfgs[TINY2], tok)
    assert gen.max_length == 64
    monkeypatch.setattr(glm.predict, "_session", lambda cfg, rows, mode: (tok, oracle.generator, gen, "glm2"))
    query = "类型#裙*颜色#红色*风格#简约*图案#格子"
    out = io.StringIO()
    glm.chat.run_chat({}, io.StringIO(f"{query}\n" * 3), out)     # EOF ends the chat like /exit
    answers = [a.rstrip("\n") for a in out.getvalue().split(">>> ")[1:]]
    assert len(answers) == 4 and answers[-1] == ""
    first = answers[0]
    assert first == oracle.answer(query)
    assert len(tok.build_generation_input(query, [(query, first)])) >= 64    # the history had to go
    assert all(a and not a.startswith("error") for a in answers[:3]), answers


# --------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("mode, args, expected", [
    ("eval", ["load_checkpoint="], ["--run_mode eval needs load_checkpoint"]),
    ("predict", ["load_checkpoint=", "--predict_data", "类型#裙"], ["--run_mode predict needs load_checkpoint"]),
    ("export", ["load_checkpoint="], ["--run_mode export needs load_checkpoint"]),
], ids=["eval", "predict", "export"])
def test_no_checkpoint(tmp_path, mode, args, expected):
    one_line_error(run_glm("--config", TINY2, "--run_mode", mode, "--output_dir", str(tmp_path), *args,
                           check=False), *expected)
    assert not (tmp_path / "metrics.json").exists() and not (tmp_path / "predict_results.jsonl").exists()


@pytest.mark.parametrize("mode, args, expected", [
    ("eval", ["model.model_config.hidden_size=64", "model.model_config.kv_channels=16"],
     ["transformer.embedding.embedding_table has shape (2048, 128) but the model expects (2048, 64)"]),
    ("predict", ["model.model_config.hidden_size=64", "model.model_config.kv_channels=16", "--predict_data", "hi"],
     ["transformer.embedding.embedding_table has shape (2048, 128) but the model expects (2048, 64)"]),
    ("export", ["model.model_config.ffn_hidden_size=256"],
     ["transformer.encoder.layers.0.mlp.dense_h_to_4h.weight has shape (688, 128) but the model expects (512, 128)"]),
], ids=["eval", "predict", "export"])
def test_checkpoint_that_does_not_fit_the_config(trained, tmp_path, mode, args, expected):
    proc = run_glm("--config", TINY2, "--run_mode", mode, "--load_checkpoint", trained["ckpt"],
                   "--output_dir", str(tmp_path), *args, check=False)
    one_line_error(proc, trained["ckpt"], *expected)
    assert not (tmp_path / "metrics.json").exists() and not (tmp_path / "predict_results.jsonl").exists()


def test_bad_prompts(trained, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n", encoding="utf-8")
    ck = ("--load_checkpoint", trained["ckpt"], "--output_dir", str(tmp_path))
    one_line_error(run_glm("--config", TINY2, "--run_mode", "predict", *ck, "--predict_data", str(empty),
                           check=False), str(empty), "the file has no prompt")
    one_line_error(run_glm("--config", TINY2, "--run_mode", "predict", *ck, "--predict_data", "ok",
                           "--predict_data", "  ", check=False), "prompt 2 is empty")
    one_line_error(run_glm("--config", TINY2, "--run_mode", "predict", *ck, check=False), "--predict_data")
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"prompt": "a"}\n{"prompt": \n', encoding="utf-8")
    one_line_error(run_glm("--config", TINY2, "--run_mode", "predict", *ck, "--predict_data", str(bad_json),
                           check=False), f"{bad_json}:2: invalid JSON")
    # Longer than seq_length 128 (and longer than a file name may be: it is a prompt, not a path).
    proc = run_glm("--config", TINY2, "--run_mode", "predict", *ck, "--predict_data", "外套" * 300, check=False)
    one_line_error(proc, "tokens do not fit model.model_config.seq_length 128")
    # Within seq_length but filling max_decode_length (prompt included): an error, not an empty answer.
    proc = run_glm("--config", TINY2, "--run_mode", "predict", *ck, "--predict_data", "类型#裙*颜色#红色*风格#简约",
                   "model.model_config.max_decode_length=20", check=False)
    one_line_error(proc, "leave no room for an answer under max_length 20", "max_decode_length")
    assert not (tmp_path / "predict_results.jsonl").exists()


def test_empty_reference_in_the_eval_file_is_a_one_line_error(tmp_path):
    """The metric needs a reference for every line: an empty summary stops eval before any generation."""
    rows = DEV.read_text(encoding="utf-8").splitlines()[:4]
    rows[2] = json.dumps({"content": json.loads(rows[2])["content"], "summary": ""}, ensure_ascii=False)
    dev = tmp_path / "dev_empty_ref.json"
    dev.write_text("\n".join(rows) + "\n", encoding="utf-8")
    out = tmp_path / "out"
    proc = run_glm("--config", TINY2, "--run_mode", "eval", "--load_checkpoint", "random", "--output_dir", str(out),
                   "--eval_dataset_dir", str(dev), check=False)
    line = one_line_error(proc, str(dev), "line 3: empty reference ('summary' is '')")
    assert proc.returncode == 2, line      # GLMError: exit code 2, as for every bad input
    assert not (out / "predictions.jsonl").exists() and not (out / "metrics.json").exists()


# ------------------------------------------------------------------------------- eval reports, in-process
def test_empty_predictions_are_reported_loudly_and_counted(tmp_path, monkeypatch, capsys):
    """Generation stubbed (no model run): samples 0, 2, 4 answer nothing, 1, 3, 5 answer their reference."""
    import glm.evaluate
    from glm.config import apply_overrides, load_config

    monkeypatch.chdir(REPO)
    refs = [json.loads(line)["summary"] for line in DEV.read_text(encoding="utf-8").splitlines()]
    calls = []

    class StubGenerator:
        def __init__(self, model, use_cache=True):
            self.seen = 0

        def generate(self, prompts, gen, streamer=None):
            calls.append(len(prompts))
            out = []
            for _ in prompts:
                i, self.seen = self.seen, self.seen + 1
                out.append([] if i % 2 == 0 else tok.encode(refs[i]))
            return out

    cfg = apply_overrides(load_config(TINY2), [f"output_dir={tmp_path}", "load_checkpoint=random",
                                               "eval_dataset.max_eval_samples=6"])
    from glm.build import build_tokenizer

    tok = build_tokenizer(cfg)
    monkeypatch.setattr(glm.evaluate, "Generator", StubGenerator)
    result = glm.evaluate.run_eval(cfg)
    captured = capsys.readouterr()
    assert calls == [4, 2]                   # runner_config.batch_size 4, max_eval_samples 6
    warnings = [ln for ln in captured.err.splitlines() if ln.startswith("WARNING")]
    assert warnings == ["WARNING: 3 of 6 predictions were empty"]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["empty_predictions"] == 3 == result["empty_predictions"] and metrics["samples"] == 6
    for k in SCORES:                         # empty -> 0, an exact copy of the reference -> 100
        assert metrics[k] == pytest.approx(50.0, abs=1e-6)
    preds = jsonl(tmp_path / "predictions.jsonl")
    assert [p["prediction"] for p in preds] == ["" if i % 2 == 0 else refs[i] for i in range(6)]
    assert [p["new_tokens"] for p in preds][::2] == [0, 0, 0]
    # The eval file's stats: printed once, and kept beside the metrics (the whole file, 40 lines).
    assert captured.out.count("data data/sample/dev.json (eval v2)") == 1
    stats = json.loads((tmp_path / "eval_data_stats.json").read_text())
    assert stats["samples"] == 40 and stats["phase"] == "eval" and stats["max_source_length"] == 48
    assert {"truncated_source", "truncated_target"} <= stats.keys() and stats["target_tokens"]["max"] > 0
    assert not [f for f in tmp_path.iterdir() if f.name.startswith(".")]    # no temp file left behind
