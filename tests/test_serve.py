"""`--run_mode serve` (issue 13): the server runs as a user starts it (run_glm.py on 127.0.0.1, a free port)
and is driven with the official `openai` client and raw HTTP.

The oracle for answers is `--run_mode predict` on the same checkpoint with greedy settings. The GLM3
tool-call round trip runs on a tiny GLM3 trained here on a few tool-call conversations, encoded by the
server's own message builder (so the prompt the server builds is the one the model learnt).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from cli_utils import FAST, REPO, TINY2, run_glm

openai = pytest.importorskip("openai")
pytestmark = pytest.mark.slow

TINY3 = "configs/glm3/run_glm3_tiny.yaml"
DECODE = "model.model_config.max_decode_length=64"
PROMPTS = [json.loads(line)["content"] for line in (REPO / "data/sample/dev.json").read_text("utf-8").splitlines()]


# ---------------------------------------------------------------------------------------------- servers
class Server:
    """run_glm.py --run_mode serve in a subprocess; `url` once it prints its address."""

    def __init__(self, *args: str):
        self.proc = subprocess.Popen([sys.executable, str(REPO / "run_glm.py"), "--run_mode", "serve", "--port", "0",
                                      *args], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env={**os.environ, "PYTHONPATH": str(REPO)})
        self.err: list[str] = []
        threading.Thread(target=lambda: self.err.extend(self.proc.stderr), daemon=True).start()
        line = self.proc.stdout.readline()       # blocks until the model is compiled and the port is open
        m = re.search(r"on (http://127\.0\.0\.1:\d+)/v1", line)
        if not m:
            self.proc.kill()
            raise AssertionError(f"server did not start: {line!r}\n{''.join(self.err)[-3000:]}")
        self.url = m.group(1)
        self.model = re.search(r"serving (\S+) on", line).group(1)

    def client(self, **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0, timeout=120, **kw)

    def stop(self) -> tuple[int, str]:
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout=60)
        return code, "".join(self.err)


@pytest.fixture(scope="module")
def glm2_ckpt(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("serve_glm2")
    run_glm("--config", TINY2, "--run_mode", "finetune", "--load_checkpoint", "random", "--output_dir", str(out),
            "--max_steps", "80", *FAST, "callbacks.CheckpointMonitor.save_checkpoint_steps=1000")
    return str(out / "checkpoint_network" / "rank_0" / "glm2-tiny_rank_0-network.ckpt")


@pytest.fixture(scope="module")
def expected(glm2_ckpt, tmp_path_factory) -> dict[str, dict]:
    """--run_mode predict's greedy answers for the first 9 dev prompts, one at a time (in a shared batch,
    max_length counts from the batch's longest prompt; the server gives every request its own budget)."""
    out = tmp_path_factory.mktemp("serve_predict")
    run_glm("--config", TINY2, "--run_mode", "predict", "--load_checkpoint", glm2_ckpt, "--output_dir", str(out),
            "--batch_size", "1", DECODE, *[a for p in PROMPTS[:9] for a in ("--predict_data", p)])
    rows = [json.loads(line) for line in (out / "predict_results.jsonl").read_text("utf-8").splitlines()]
    return {r["prompt"]: r for r in rows}


@pytest.fixture(scope="module")
def server(glm2_ckpt, tmp_path_factory):
    srv = Server("--config", TINY2, "--load_checkpoint", glm2_ckpt, DECODE, "serve.batch_size=8",
                 "--output_dir", str(tmp_path_factory.mktemp("serve_out")))   # one run per output folder
    yield srv
    # Graceful shutdown: a stream in flight when SIGTERM arrives still ends with [DONE]; the process exits 0.
    done: list[str] = []
    started = threading.Event()

    def stream():
        with httpx.stream("POST", srv.url + "/v1/chat/completions", timeout=60, json={
                "model": srv.model, "stream": True, "temperature": 0, "max_tokens": 60,
                "messages": [{"role": "user", "content": PROMPTS[20]}]}) as r:
            for line in r.iter_lines():
                started.set()
                if line:
                    done.append(line)

    t = threading.Thread(target=stream)
    t.start()
    assert started.wait(60)
    code, err = srv.stop()
    t.join(60)
    assert code == 0, err[-2000:]
    assert "server stopped" in err and "Traceback" not in err, err[-2000:]
    assert done and done[-1] == "data: [DONE]", done[-3:]


def ask(srv: Server, prompt: str, **kw):
    return srv.client().chat.completions.create(model=srv.model, messages=[{"role": "user", "content": prompt}],
                                                temperature=0, **kw)


def stream_text(srv: Server, prompt: str, **kw) -> tuple[str, list]:
    chunks = list(srv.client().chat.completions.create(
        model=srv.model, messages=[{"role": "user", "content": prompt}], temperature=0, stream=True, **kw))
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices), chunks


# ------------------------------------------------------------------------------------------------ tests
def test_completion_equals_predict_and_reports_usage(server, expected):
    for prompt in PROMPTS[:2]:
        r = ask(server, prompt)
        want = expected[prompt]
        assert r.choices[0].message.content == want["response"]
        assert r.choices[0].message.role == "assistant" and r.model == server.model
        assert r.choices[0].finish_reason == "stop"
        assert r.usage.completion_tokens == want["new_tokens"]
        assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
        assert r.usage.prompt_tokens == len(prompt_ids(prompt))


def prompt_ids(prompt: str) -> list[int]:
    from glm.tokenizer import ChatGLM2Tokenizer

    return ChatGLM2Tokenizer(REPO / "data/sample/tokenizer.model").build_generation_input(prompt)


def test_streamed_chunks_concatenate_to_the_same_text(server, expected):
    prompt = PROMPTS[0]
    text, chunks = stream_text(server, prompt, stream_options={"include_usage": True})
    assert text == expected[prompt]["response"]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 3     # really streamed
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["stop"]
    assert chunks[-1].usage.completion_tokens == expected[prompt]["new_tokens"]
    assert len({c.id for c in chunks}) == 1


def test_max_tokens_stop_and_seed(server, expected):
    prompt = PROMPTS[1]
    full = expected[prompt]["response"]
    r = ask(server, prompt, max_tokens=3)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 3
    assert full.startswith(r.choices[0].message.content)
    # A stop string from the second half of the answer that does not also occur at its very start (a
    # repetitive answer such as '，，，…是…' would otherwise stop before the first token).
    cut = next((full[i:i + 2] for i in range(len(full) // 2, len(full) - 1) if full.index(full[i:i + 2]) > 0),
               None)
    assert cut is not None, full
    r = ask(server, prompt, stop=[cut])
    assert r.choices[0].message.content == full[:full.index(cut)] and r.choices[0].finish_reason == "stop"
    text, _ = stream_text(server, prompt, stop=cut)
    assert text == full[:full.index(cut)]
    sampled = [server.client().chat.completions.create(
        model=server.model, messages=[{"role": "user", "content": prompt}], temperature=1.5, seed=s,
        max_tokens=20).choices[0].message.content for s in (1, 1, 2)]
    assert sampled[0] == sampled[1] != sampled[2]


def test_eight_concurrent_streams_get_complete_answers_in_few_batches(server, expected):
    prompts = PROMPTS[1:9]
    before = httpx.get(server.url + "/health").json()["batches"]
    results: dict[int, str] = {}

    def run(i: int) -> None:
        results[i] = stream_text(server, prompts[i])[0]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert [results.get(i) for i in range(8)] == [expected[p]["response"] for p in prompts]
    batches = httpx.get(server.url + "/health").json()["batches"] - before
    assert batches < 8, f"8 concurrent requests ran in {batches} batches: no batching"


KILLED_CLIENT = """
import sys, openai
c = openai.OpenAI(base_url=sys.argv[1], api_key="x", max_retries=0)
for chunk in c.chat.completions.create(model=sys.argv[2], messages=[{"role": "user", "content": sys.argv[3]}],
                                       stream=True, temperature=1.0, seed=3, max_tokens=60):
    print("chunk", flush=True)
"""


def test_a_client_killed_mid_stream_does_not_disturb_the_others(server, expected):
    victim = subprocess.Popen([sys.executable, "-c", KILLED_CLIENT, server.url + "/v1", server.model, PROMPTS[9]],
                              stdout=subprocess.PIPE, text=True)
    results: dict[int, str] = {}

    def run(i: int) -> None:
        results[i] = stream_text(server, PROMPTS[1 + i])[0]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    assert victim.stdout.readline().strip() == "chunk"
    victim.kill()
    victim.wait()
    for t in threads:
        t.join(180)
    assert [results.get(i) for i in range(3)] == [expected[p]["response"] for p in PROMPTS[1:4]]
    deadline = time.time() + 30
    while httpx.get(server.url + "/health").json()["running"] and time.time() < deadline:
        time.sleep(0.2)
    assert httpx.get(server.url + "/health").json()["running"] == 0
    assert ask(server, PROMPTS[0]).choices[0].message.content == expected[PROMPTS[0]]["response"]


def _bad_requests(model: str) -> list[tuple[str, dict]]:
    msg = [{"role": "user", "content": "你好"}]
    ok = {"model": model, "messages": msg}
    return [
        ("not json", {"content": b"{not json", "headers": {"content-type": "application/json"}}),
        ("json list", {"json": [1, 2]}),
        ("no messages", {"json": {"model": model}}),
        ("empty messages", {"json": {"model": model, "messages": []}}),
        ("unknown field", {"json": {**ok, "temprature": 0.5}}),
        ("temperature str", {"json": {**ok, "temperature": "hot"}}),
        ("temperature > 2", {"json": {**ok, "temperature": 3}}),
        ("max_tokens 0", {"json": {**ok, "max_tokens": 0}}),
        ("max_tokens float", {"json": {**ok, "max_tokens": 2.5}}),
        ("stream str", {"json": {**ok, "stream": "yes"}}),
        ("bad role", {"json": {**ok, "messages": [{"role": "robot", "content": "hi"}]}}),
        ("content int", {"json": {**ok, "messages": [{"role": "user", "content": 5}]}}),
        ("unknown model", {"json": {**ok, "model": "gpt-4"}}),
        ("n = 2", {"json": {**ok, "n": 2}}),
        ("presence penalty", {"json": {**ok, "presence_penalty": 0.5}}),
        ("ends with assistant", {"json": {**ok, "messages": msg + [{"role": "assistant", "content": "hi"}]}}),
        ("tools on GLM2", {"json": {**ok, "tools": [{"type": "function", "function": {"name": "f"}}]}}),
        ("prompt too long", {"json": {**ok, "messages": [{"role": "user", "content": "类型#裙" * 400}]}}),
        ("5 stop strings", {"json": {**ok, "stop": ["a", "b", "c", "d", "e"]}}),
        ("json mode", {"json": {**ok, "response_format": {"type": "json_object"}}}),
        ("seed str", {"json": {**ok, "seed": "1"}}),
    ]


def test_malformed_requests_get_a_4xx_with_a_message_and_the_server_keeps_answering(server, expected):
    seen = []
    with httpx.Client(base_url=server.url, timeout=60) as http:
        for name, kw in _bad_requests(server.model):
            r = http.post("/v1/chat/completions", **kw)
            assert 400 <= r.status_code < 500, (name, r.status_code, r.text)
            err = r.json()["error"]
            assert err["message"] and err["type"], (name, err)
            seen.append((name, r.status_code, err["message"]))
        r = http.get("/v1/chat/completions")
        assert r.status_code == 405 and r.json()["error"]["message"]
    messages = dict((n, m) for n, _, m in seen)
    assert "temprature" in messages["unknown field"]
    assert "seq_length" in messages["prompt too long"] and "tokens" in messages["prompt too long"]
    assert "gpt-4" in messages["unknown model"] and server.model in messages["unknown model"]
    assert dict((n, c) for n, c, _ in seen)["unknown model"] == 404
    with pytest.raises(openai.BadRequestError, match="temperature"):
        server.client().chat.completions.create(model=server.model, messages=[{"role": "user", "content": "x"}],
                                                temperature=5)
    assert ask(server, PROMPTS[0]).choices[0].message.content == expected[PROMPTS[0]]["response"]


def test_models_and_health(server):
    models = server.client().models.list()
    assert [m.id for m in models.data] == [server.model] == ["glm2_tiny"]
    health = httpx.get(server.url + "/health").json()
    assert health["status"] == "ok" and health["batch_rows"] == 8


# ------------------------------------------------------------------------------------ GLM3 tool calls
# A name-only tool keeps the prompt short (the sample tokenizer spells English and JSON byte by byte).
TOOLS = [{"type": "function", "function": {"name": "get_weather"}}]
CITIES = {"北京": "晴，22度", "上海": "小雨，18度", "广州": "多云，28度"}


def _tool_conversations(tok) -> list[tuple[list[int], list[bool]]]:
    """(ids, target flags) of each conversation, from glm.chat_format (the builder training and the server
    share): a tool call, its observation, the answer."""
    from glm.chat_format import conversation_ids, normalize_messages

    out = []
    for city, weather in CITIES.items():
        conv = [{"role": "user", "content": f"{city}天气怎么样"},
                {"role": "assistant", "metadata": "get_weather", "content": json.dumps({"city": city},
                                                                                       ensure_ascii=False)},
                {"role": "observation", "content": json.dumps({"weather": weather}, ensure_ascii=False)},
                {"role": "assistant", "content": f"{city}今天{weather}"}]
        out.append(conversation_ids(tok, normalize_messages(conv, tools=[t["function"] for t in TOOLS])))
    return out


def train_tool_model(path: Path, seq: int = 320, steps: int = 150) -> None:
    """A tiny GLM3 fitted to the tool-call conversations (loss on the answers only), saved to `path`."""
    import numpy as np

    from glm.build import build_model
    from glm.config import apply_overrides, load_config
    from glm.optim import AdamW
    from glm.runtime import setup_context
    from glm.tokenizer import ChatGLM3Tokenizer
    from glm.train_step import TrainStep
    from glm.weights import write_ms_checkpoint

    setup_context("CPU", 0)
    cfg = apply_overrides(load_config(str(REPO / TINY3)), [f"model.model_config.seq_length={seq}"])
    tok = ChatGLM3Tokenizer(REPO / "data/sample/tokenizer.model")
    convs = _tool_conversations(tok)
    width = -(-max(len(c) for c, _ in convs) // 16) * 16
    assert width <= seq, width
    ids = np.zeros((len(convs), width), np.int32)
    labels = np.full((len(convs), width), -100, np.int32)
    for row, (conv, target) in enumerate(convs):
        ids[row, :len(conv)] = conv
        for t in range(1, len(conv)):            # labels[t - 1] = the token at t, when it is a target
            if target[t]:
                labels[row, t - 1] = conv[t]
    model, _ = build_model(cfg)
    step = TrainStep(model, AdamW(model.trainable_params()), 1.0, None, 1)
    model.set_train(True)
    for i in range(steps):
        lr = 3e-3 * min(1.0, (i + 1) / 10)
        loss, finite, _ = step.run([(ids, labels)], [1.0], lr, i + 1)
        if loss < 0.01:
            break
    print(f"tool model: {i + 1} steps, loss {loss:.4f}", file=sys.stderr)
    assert finite and loss < 0.05, loss
    write_ms_checkpoint({p.name: p.asnumpy() for p in model.get_parameters() if not p.name.endswith("_cache")},
                        path)


@pytest.fixture(scope="module")
def tool_server(tmp_path_factory):
    ckpt = tmp_path_factory.mktemp("serve_glm3") / "glm3-tools.ckpt"
    proc = subprocess.run([sys.executable, "-c", f"import sys; sys.path[:0] = [{str(REPO)!r}, "
                           f"{str(REPO / 'tests')!r}]; from test_serve import train_tool_model; "
                           f"train_tool_model(__import__('pathlib').Path({str(ckpt)!r}))"],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    srv = Server("--config", TINY3, "--load_checkpoint", str(ckpt), "--output_dir", str(ckpt.parent / "out"),
                 "model.model_config.seq_length=320",
                 "model.model_config.max_decode_length=320", "serve.batch_size=2")
    yield srv
    code, err = srv.stop()
    assert code == 0, err[-2000:]


def test_glm3_tool_call_round_trip(tool_server):
    client = tool_server.client()
    messages = [{"role": "user", "content": "上海天气怎么样"}]
    r = client.chat.completions.create(model=tool_server.model, messages=messages, tools=TOOLS, temperature=0)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and not choice.message.content
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "上海"}
    # Streaming gives the same call as one tool_calls delta.
    chunks = list(client.chat.completions.create(model=tool_server.model, messages=messages, tools=TOOLS,
                                                 temperature=0, stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert "".join(d.content or "" for d in deltas) == ""
    (streamed,) = [tc for d in deltas for tc in (d.tool_calls or [])]
    assert streamed.function.name == "get_weather" and json.loads(streamed.function.arguments) == {"city": "上海"}
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["tool_calls"]
    # The tool's result goes back as a `tool` message; the answer uses it.
    messages += [{"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                 {"role": "tool", "tool_call_id": call.id,
                  "content": json.dumps({"weather": CITIES["上海"]}, ensure_ascii=False)}]
    r = client.chat.completions.create(model=tool_server.model, messages=messages, tools=TOOLS, temperature=0)
    assert r.choices[0].finish_reason == "stop" and not r.choices[0].message.tool_calls
    assert r.choices[0].message.content == f"上海今天{CITIES['上海']}"
    text = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model=tool_server.model, messages=messages, tools=TOOLS, temperature=0, stream=True) if c.choices)
    assert text == r.choices[0].message.content
