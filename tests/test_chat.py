"""`--run_mode chat` (issue 13): slash commands answered locally, the system prompt and tools reaching the
prompt, GLM3 tool calls with a typed observation, the notice when old turns are dropped.

The logic runs in-process against a scripted generator (it records each prompt and "generates" given
text), so the prompts can be compared with the tokenizer's own chat format; one test drives the real
command in a pseudo-terminal, as a user types into it.
"""

from __future__ import annotations

import io
import json
import os
import pty
import select
import subprocess
import sys
import time
from dataclasses import dataclass

import pytest
from cli_utils import REPO

from glm.chat_format import TOOL_SYSTEM_PROMPT
from glm.tokenizer import ChatGLM2Tokenizer, ChatGLM3Tokenizer

VOCAB = REPO / "data/sample/tokenizer.model"
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]


@dataclass
class _Cfg:
    seq_length: int


@dataclass
class _Gen:
    max_new_tokens: object = None
    max_length: int = 200


class ScriptedGenerator:
    """Stands in for glm.generate.Generator: records prompts, streams the next scripted reply's tokens."""

    def __init__(self, tok, replies: list[str], seq_length: int = 512):
        self.tok, self.replies, self.prompts = tok, list(replies), []
        self.cfg, self.rows = _Cfg(seq_length), 1

    def generate(self, prompts, gen, streamer=None):
        self.prompts.append(list(prompts[0]))
        ids = self.tok.sp.encode(self.replies.pop(0))
        for t in ids:
            streamer(0, t)
        return [ids]


def chat(monkeypatch, tok, replies: list[str], typed: str, max_length: int = 200, fmt: str = ""):
    import glm.predict
    from glm.chat import run_chat
    from glm.prompt_format import family_format

    gen = ScriptedGenerator(tok, replies)
    monkeypatch.setattr(glm.predict, "_session",
                        lambda cfg, rows, mode: (tok, gen, _Gen(max_length=max_length), fmt or family_format(tok)))
    out = io.StringIO()
    run_chat({}, io.StringIO(typed), out)
    return out.getvalue(), gen


def test_commands_are_answered_locally_and_never_reach_the_model(monkeypatch):
    tok = ChatGLM2Tokenizer(VOCAB)
    text, gen = chat(monkeypatch, tok, ["好的"], "/help\n/history\n/tools x.json\n//reset\n/exit\n你好\n")
    assert text.startswith("loading ")
    for cmd in ("/help", "/reset", "/exit", "/system TEXT", "/tools FILE"):
        assert cmd in text
    assert "unknown command /history; /help lists the commands" in text
    assert "/tools needs the glm3_chat prompt format (this model uses glm2)" in text
    assert gen.prompts == [tok.build_generation_input("/reset")]     # "//" sends a literal "/"; /exit quit


def test_system_prompt_reaches_the_prompt_and_starts_a_new_conversation(monkeypatch):
    tok = ChatGLM3Tokenizer(VOCAB)
    text, gen = chat(monkeypatch, tok, ["\n答一", "\n答二", "\n答三"],
                     "问一\n/system 你是裁缝\n问二\n问三\n/system\n")
    assert "(system prompt set: 你是裁缝; new conversation)" in text and "(system prompt removed)" in text
    system = {"role": "system", "content": "你是裁缝"}
    assert gen.prompts[0] == tok.build_chat_input("问一")
    assert gen.prompts[1] == tok.build_chat_input("问二", [system])          # the first turn is gone
    assert gen.prompts[2] == tok.build_chat_input("问三", [system, {"role": "user", "content": "问二"},
                                                         {"role": "assistant", "content": "答二"}])
    answers = text.split(">>> ")[1:]
    assert [answers[i] for i in (0, 2, 3)] == ["答一\n", "答二\n", "答三\n"]   # GLM3's metadata line is not shown


def test_old_turns_are_dropped_with_a_notice(monkeypatch):
    tok = ChatGLM2Tokenizer(VOCAB)
    long = "类型#裙*颜色#红色*风格#简约*图案#格子"
    reply = "这条裙子简约大方" * 3
    one_turn = len(tok.build_generation_input(long, [(long, reply)]))
    text, gen = chat(monkeypatch, tok, [reply] * 3, f"{long}\n{long}\n{long}\n", max_length=one_turn)
    assert text.count("(dropped the 1 oldest turn to fit the") == 2
    assert all(p == tok.build_generation_input(long) for p in gen.prompts)
    assert all(len(p) < one_turn for p in gen.prompts)


def test_the_checkpoint_prompt_format_is_used_not_the_family_template(monkeypatch):
    """A GLM3 fine-tuned on ADGEN version 2 (glm2) chats in "[Round n]" rounds, one fine-tuned on version 3
    (raw) gets the text as is, earlier turns prepended as text with a one-time notice: the prompts predict's
    encode_prompt builds, not ChatGLM3's role tokens."""
    from glm.prompt_format import encode_prompt

    tok = ChatGLM3Tokenizer(VOCAB)
    text, gen = chat(monkeypatch, tok, ["答一", "答二"], "问一\n问二\n/tools x.json\n", fmt="glm2")
    assert text.startswith("loading") and "prompt format: glm2" in text
    assert gen.prompts == [encode_prompt(tok, "glm2", "问一"), encode_prompt(tok, "glm2", "问二", [("问一", "答一")])]
    assert tok.decode(gen.prompts[1]).endswith("[Round 2]\n\n问：问二\n\n答：")
    assert "/tools needs the glm3_chat prompt format (this model uses glm2)" in text
    text, gen = chat(monkeypatch, tok, ["答一", "答二", "答三"], "问一\n问二\n问三\n", fmt="raw")
    assert gen.prompts == [encode_prompt(tok, "raw", "问一"), encode_prompt(tok, "raw", "问二", [("问一", "答一")]),
                           encode_prompt(tok, "raw", "问三", [("问一", "答一"), ("问二", "答二")])]
    assert gen.prompts[0] == tok.encode("问一") and tok.special_tokens["<|user|>"] not in gen.prompts[2]
    assert text.count("earlier turns are prepended as plain text") == 1


def test_glm3_tool_call_is_shown_and_the_typed_observation_goes_back(monkeypatch, tmp_path):
    tok = ChatGLM3Tokenizer(VOCAB)
    tools = tmp_path / "tools.json"
    tools.write_text(json.dumps(TOOLS), encoding="utf-8")
    call = {"role": "assistant", "metadata": "get_weather", "content": '{"city": "上海"}'}
    text, gen = chat(monkeypatch, tok, ["get_weather\n" + call["content"], "\n上海小雨"],
                     f"/tools {tools}\n上海天气\n{{\"weather\": \"小雨\"}}\n/tools off\n/tools\n", max_length=512)
    assert "(tools: get_weather)" in text
    assert '[tool call] get_weather({"city": "上海"})' in text and "observation>" in text
    assert "上海小雨" in text and "(tools removed)" in text and "(no tools;" in text
    system = {"role": "system", "content": TOOL_SYSTEM_PROMPT, "tools": [TOOLS[0]["function"]]}
    assert gen.prompts[0] == tok.build_chat_input("上海天气", [system])
    assert gen.prompts[1] == tok.build_chat_input('{"weather": "小雨"}', [
        system, {"role": "user", "content": "上海天气"}, call], role="observation")
    assert '{"city"' not in text.replace('get_weather({"city"', "")   # the raw call is not printed as an answer


def test_tools_file_errors_are_one_line(monkeypatch, tmp_path):
    tok = ChatGLM3Tokenizer(VOCAB)
    bad = tmp_path / "bad.json"
    bad.write_text("[{\"description\": \"no name\"}]", encoding="utf-8")
    text, gen = chat(monkeypatch, tok, [], f"/tools {tmp_path}/missing.json\n/tools {bad}\n")
    assert f"error: /tools {tmp_path}/missing.json: cannot read it" in text
    assert f"error: /tools {bad}: item 0 is not a tool" in text
    assert gen.prompts == []


# ------------------------------------------------------------------------------------------ real terminal
class Terminal:
    def __init__(self, *args: str):
        self.master, slave = pty.openpty()
        self.proc = subprocess.Popen([sys.executable, str(REPO / "run_glm.py"), *args], cwd=REPO, stdin=slave,
                                     stdout=slave, stderr=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(REPO)})
        os.close(slave)
        self.seen, self.mark = "", 0

    def expect(self, text: str, timeout: float = 240) -> str:
        """Wait until `text` shows after the last typed line."""
        deadline = time.time() + timeout
        while text not in self.seen[self.mark:]:
            ready, _, _ = select.select([self.master], [], [], max(0.0, deadline - time.time()))
            if not ready:
                raise AssertionError(f"waited for {text!r}; the terminal shows:\n{self.seen[-2000:]}")
            try:
                self.seen += os.read(self.master, 65536).decode("utf-8", "replace")
            except OSError:   # EIO: the program closed the terminal (it exited)
                try:
                    self.proc.wait(30)
                except subprocess.TimeoutExpired:
                    pass
                err = self.proc.stderr.read().decode("utf-8", "replace") if self.proc.poll() is not None else ""
                raise AssertionError(f"waited for {text!r}, but the program ended ({self.proc.poll()}):\n"
                                     f"{self.seen[-2000:]}\n{err[-2000:]}") from None
        return self.seen

    def type(self, line: str) -> None:
        self.mark = len(self.seen)
        os.write(self.master, (line + "\n").encode("utf-8"))


@pytest.mark.slow
def test_chat_in_a_terminal(tmp_path):
    """A random-weight tiny GLM2 answers until its 48-token window is full, so the second message must
    drop the first turn."""
    term = Terminal("--config", "configs/glm2/run_glm2_tiny.yaml", "--run_mode", "chat", "--load_checkpoint",
                    "random", "model.model_config.max_decode_length=48")
    try:
        term.expect("loading glm2_tiny")
        term.expect(">>> ")
        term.type("/help")
        term.expect("/system TEXT")
        term.type("/history")
        term.expect("unknown command /history")
        term.type("/system 你是裁缝")
        term.expect("(system prompt set: 你是裁缝; new conversation)")
        term.type("类型#裙*颜色#红色")
        term.expect(">>> ", 120)
        term.type("类型#裤*颜色#蓝色")
        term.expect("(dropped the 1 oldest turn to fit the 48-token window)")
        term.expect(">>> ", 60)
        term.type("/exit")
        assert term.proc.wait(60) == 0
    finally:
        if term.proc.poll() is None:
            term.proc.kill()
        os.close(term.master)
    assert "Traceback" not in term.seen


def test_server_messages_follow_the_prompt_format():
    """The HTTP API's builder (shared with chat): system text opens the first question for glm2/raw, history
    becomes [Round n] rounds (glm2) or plain text (raw), and tools need glm3_chat."""
    from glm.prompt_format import encode_prompt
    from glm.serve.protocol import ChatRequest, RequestError, encode_messages

    tok = ChatGLM3Tokenizer(VOCAB)
    msgs = [{"role": "system", "content": "你是裁缝"}, {"role": "user", "content": "问一"},
            {"role": "assistant", "content": "答一"}, {"role": "user", "content": "问二"}]
    req = ChatRequest(model="m", messages=msgs)
    for fmt in ("glm2", "raw"):
        assert encode_messages(tok, req, fmt) == (encode_prompt(tok, fmt, "问二", [("你是裁缝\n\n问一", "答一")]), [])
    assert encode_messages(tok, req)[0] == encode_messages(tok, req, "glm3_chat")[0] != encode_messages(tok, req, "raw")[0]
    with pytest.raises(RequestError, match="tools: tool calls need the glm3_chat prompt format .*uses raw"):
        encode_messages(tok, ChatRequest(model="m", messages=msgs, tools=TOOLS), "raw")


def test_serve_and_chat_take_prompt_format_flags():
    from click.testing import CliRunner

    from glm.cli import cli, resolve_run_config

    for mode in ("serve", "chat"):
        help_text = CliRunner().invoke(cli, [mode, "--help"]).output
        assert "--prompt_format" in help_text and "--raw_prompt" in help_text, help_text
        cfg = resolve_run_config(str(REPO / "configs/glm3/run_glm3_tiny.yaml"), mode, {"prompt_format": "glm2"})
        assert cfg["prompt_format"] == "glm2"
