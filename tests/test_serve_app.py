"""The server's HTTP app and batching engine with a scripted generator (no model): the queue bound (429),
requests batched together, stop strings across token boundaries, and GLM3 reply shaping."""

from __future__ import annotations

import threading
import time

import pytest
from cli_utils import REPO
from fastapi.testclient import TestClient

from glm.generate import GenerationConfig, Generator
from glm.serve.app import create_app
from glm.serve.engine import Engine
from glm.serve.protocol import ReplyStream, parse_reply
from glm.tokenizer import ChatGLM2Tokenizer


class _Cfg:
    seq_length = 256


class ScriptedGenerator:
    """Streams the tokens of `reply` to every row, after `gate` opens; records each batch's size."""

    budget = Generator.budget

    def __init__(self, tok, reply: str, rows: int):
        self.tok, self.rows, self.cfg = tok, rows, _Cfg()
        self.reply = tok.sp.encode(reply)
        self.gate = threading.Event()
        self.batches: list[int] = []

    def generate(self, prompts, gens, streamer=None):
        self.batches.append(len(prompts))
        assert self.gate.wait(30)
        out = [[] for _ in prompts]
        done = [False] * len(prompts)
        for t in self.reply:
            for r in range(len(prompts)):
                if not done[r] and len(out[r]) < self.budget(prompts[r], gens[r]):
                    out[r].append(t)
                    done[r] = bool(streamer(r, t))
        return out


@pytest.fixture
def tok():
    return ChatGLM2Tokenizer(REPO / "data/sample/tokenizer.model")


def _app(tok, reply: str, rows: int, max_queue: int):
    gen = ScriptedGenerator(tok, reply, rows)
    engine = Engine(tok, gen, max_queue)
    engine.start()
    default = GenerationConfig(max_length=256, eos_token_id=[2])
    return TestClient(create_app(engine, "m", default)), gen, engine


def _ask(client, content: str = "你好", **kw):
    return client.post("/v1/chat/completions", json={"model": "m", "messages": [{"role": "user", "content": content}],
                                                      **kw})


def test_a_full_queue_answers_429_and_the_waiting_requests_still_complete(tok):
    client, gen, engine = _app(tok, "这条裙子很好看", rows=1, max_queue=1)
    results = {}
    first = threading.Thread(target=lambda: results.setdefault("a", _ask(client)))
    first.start()
    while engine.busy_rows == 0:          # the first request holds the only row
        time.sleep(0.01)
    second = threading.Thread(target=lambda: results.setdefault("b", _ask(client)))
    second.start()
    while engine.waiting.qsize() == 0:    # the second waits in the queue
        time.sleep(0.01)
    r = _ask(client)
    assert r.status_code == 429 and "waiting" in r.json()["error"]["message"]
    assert r.json()["error"]["type"] == "rate_limit_error"
    gen.gate.set()
    first.join(30)
    second.join(30)
    assert [results[k].status_code for k in "ab"] == [200, 200]
    assert results["a"].json()["choices"][0]["message"]["content"] == "这条裙子很好看"
    engine.close()


def test_waiting_requests_share_one_batch_and_stop_strings_cut_across_tokens(tok):
    client, gen, engine = _app(tok, "这条裙子很好看", rows=4, max_queue=8)
    results = {}
    threads = [threading.Thread(target=lambda i=i: results.setdefault(i, _ask(client, stop=["子很"] if i else None)))
               for i in range(3)]
    for t in threads:
        t.start()
    while engine.busy_rows + engine.waiting.qsize() < 3:
        time.sleep(0.01)
    time.sleep(0.1)
    gen.gate.set()
    for t in threads:
        t.join(30)
    texts = [results[i].json()["choices"][0]["message"]["content"] for i in range(3)]
    assert texts == ["这条裙子很好看", "这条裙", "这条裙"]
    assert [results[i].json()["choices"][0]["finish_reason"] for i in range(3)] == ["stop"] * 3
    assert sum(gen.batches) == 3 and len(gen.batches) <= 2
    r = _ask(client, max_tokens=2)
    assert r.json()["choices"][0]["finish_reason"] == "length" and r.json()["usage"]["completion_tokens"] == 2
    engine.close()


def test_glm3_reply_stream_matches_the_final_parse():
    tools = [{"name": "get_weather"}]
    call = '{"city": "上海"}'
    python_call = "```python\ntool_call(city='上海')\n```"     # ChatGLM3's own demo format
    cases = ["\n 上海今天小雨", "get_weather\n" + call, "get_weather\n" + python_call, "get_w",
             "getaway car\nis here", "上海\n下雨", "get_weather\nnot a call", "\n两行\n回答 "]
    for text in cases:
        stream = ReplyStream(tools, glm3=True)
        shown = "".join(stream.feed(ch) for ch in text)
        last, streamed_call = stream.finish()
        content, final_call = parse_reply(text, tools, glm3=True)
        assert shown + last == content and streamed_call == final_call, text
    for text in ("get_weather\n" + call, "get_weather\n" + python_call):
        assert parse_reply(text, tools, True)[1] == {"name": "get_weather", "arguments": '{"city": "上海"}'}
