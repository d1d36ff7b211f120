"""`--run_mode chat`: a multi-turn chat in the terminal, streaming each answer as it is generated.

Lines starting with "/" are commands, answered here and never sent to the model (see HELP). The
conversation is kept as OpenAI-style messages and encoded by the server's builder
(`glm.serve.protocol.encode_messages`) in the prompt format the checkpoint was fine-tuned with (as predict
and eval; `--prompt_format` overrides), so the terminal, the HTTP API and predict put the same prompt in
front of the model. A `raw` model (data_loader version 3) knows no turns: earlier turns are prepended as
plain text, said once. When the history outgrows the model's window, the oldest turns are dropped with a
notice.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional, TextIO

from glm import GLMError

HELP = """commands:
  /help           this list
  /reset          forget the conversation (the system prompt and tools stay)
  /system TEXT    set the system prompt (empty: remove it); starts a new conversation
  /tools FILE     offer the tools in FILE.json to the model (ChatGLM3; a list of OpenAI tools or functions)
  /tools          show the tools offered; /tools off removes them
  /exit           quit (Ctrl-D too)
  //TEXT          send TEXT starting with a single "/" to the model"""


class _Printer:
    """Streams decoded text: decodes all new tokens so far and prints what was not printed yet
    (a byte-fallback piece may be half a character until its next piece arrives). With a `reply`
    (glm.serve.protocol.ReplyStream) the text is shaped as the server shapes it (GLM3: no metadata line,
    a tool call held back)."""

    def __init__(self, tok, out=sys.stdout, reply=None):
        self.tok, self.out, self.reply, self.tokens, self.shown = tok, out, reply, [], ""

    def __call__(self, row: int, token: int) -> None:
        self.tokens.append(token)
        text = self.tok.decode(self.tokens)
        if text.endswith("\ufffd"):
            return
        piece = text[len(self.shown):]
        self.shown = text
        if self.reply is not None:
            piece = self.reply.feed(piece)
        self.out.write(piece)
        self.out.flush()


def load_tools(path: str) -> list[dict]:
    """OpenAI tools ([{"type": "function", "function": {...}}]) or bare function specs from a JSON file."""
    p = Path(path).expanduser()
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except OSError as e:
        raise GLMError(f"/tools {path}: cannot read it ({e.strerror})") from None
    except ValueError as e:
        raise GLMError(f"/tools {path}: not valid JSON ({e})") from None
    items = data if isinstance(data, list) else [data]
    tools = []
    for i, item in enumerate(items):
        fn = item.get("function", item) if isinstance(item, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise GLMError(f"/tools {path}: item {i} is not a tool (expected an object with a 'name', "
                           "or {\"type\": \"function\", \"function\": {...}})")
        tools.append({"type": "function", "function": fn})
    return tools


class ChatSession:
    """The conversation: a system prompt, tools, and turns (each a list of messages, user first)."""

    def __init__(self, tok, generator, gen, fmt: str = ""):
        from glm.prompt_format import family_format

        self.tok, self.generator, self.gen = tok, generator, gen
        self.fmt = fmt or family_format(tok)
        self.glm3 = self.fmt == "glm3_chat"   # role tokens: system prompt, tools, metadata lines
        self.told_raw = False
        self.system: str = ""
        self.tools: list[dict] = []
        self.turns: list[list[dict]] = []

    def messages(self, turns: list[list[dict]]) -> list[dict]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + [m for t in turns for m in t]

    def encode(self, turns: list[list[dict]]) -> list[int]:
        from glm.serve.protocol import ChatRequest, RequestError, encode_messages

        try:
            req = ChatRequest(model="chat", messages=self.messages(turns), tools=self.tools or None)
            return encode_messages(self.tok, req, self.fmt)[0]
        except RequestError as e:
            raise GLMError(e.message) from None

    def limit(self) -> int:
        seq = self.generator.cfg.seq_length
        return seq if self.gen.max_new_tokens is not None else min(self.gen.max_length or seq, seq)

    def fit(self, current: list[dict]) -> tuple[list[int], int]:
        """Prompt ids for the history + the current turn, dropping the oldest turns until an answer fits."""
        dropped = 0
        while True:
            ids = self.encode(self.turns[dropped:] + [current])
            if len(ids) < self.limit() or dropped == len(self.turns):
                break
            dropped += 1
        if dropped:
            self.turns = self.turns[dropped:]
        return ids, dropped


def run_chat(cfg: dict, stdin: TextIO = sys.stdin, stdout: TextIO = sys.stdout) -> None:
    import glm.predict as predict
    from glm.settings import as_run

    name = (as_run(cfg).trainer.model_name if cfg else "") or "the model"
    stdout.write(f"loading {name}… (building and compiling the model)\n")
    stdout.flush()
    tok, generator, gen, fmt = predict._session(cfg, 1, "chat")
    if hasattr(generator, "warm_up"):
        generator.warm_up(gen)
    chat = ChatSession(tok, generator, gen, fmt)
    stdout.write(f"prompt format: {fmt}\n")
    stdout.write("chat: type a message; /help lists the commands, /reset clears the history, /exit quits\n")
    while True:
        stdout.write(">>> ")
        stdout.flush()
        line = stdin.readline()
        if not line:
            break
        text = line.rstrip("\n")
        if text.startswith("/") and not text.startswith("//"):
            if _command(chat, text.strip(), stdout):
                break
            continue
        text = text[1:] if text.startswith("//") else text
        if not text.strip():
            continue
        _turn(chat, {"role": "user", "content": text.strip()}, stdin, stdout)


def _command(chat: ChatSession, text: str, out: TextIO) -> bool:
    """Run a slash command; True means quit."""
    cmd, _, arg = text.partition(" ")
    arg = arg.strip()
    if cmd in ("/exit", "/quit"):
        return True
    if cmd == "/help":
        out.write(HELP + "\n")
    elif cmd == "/reset":
        chat.turns = []
        out.write("(history cleared)\n")
    elif cmd == "/system":
        chat.system, chat.turns = arg, []
        out.write(f"(system prompt set: {arg}; new conversation)\n" if arg else "(system prompt removed)\n")
    elif cmd == "/tools":
        _tools_command(chat, arg, out)
    else:
        out.write(f"unknown command {cmd}; /help lists the commands (start with // to send a literal /)\n")
    return False


def _tools_command(chat: ChatSession, arg: str, out: TextIO) -> None:
    if not chat.glm3:
        out.write(f"/tools needs the glm3_chat prompt format (this model uses {chat.fmt})\n")
    elif not arg:
        names = ", ".join(t["function"]["name"] for t in chat.tools)
        out.write(f"(tools: {names})\n" if names else "(no tools; /tools FILE.json offers some)\n")
    elif arg == "off":
        chat.tools = []
        out.write("(tools removed)\n")
    else:
        try:
            chat.tools = load_tools(arg)
        except GLMError as e:
            out.write(f"error: {e}\n")
            return
        out.write(f"(tools: {', '.join(t['function']['name'] for t in chat.tools)})\n")


def _turn(chat: ChatSession, message: dict, stdin: TextIO, out: TextIO) -> None:
    """Answer one user message; a tool call asks for the tool's result and answers again."""
    current = [message]
    while True:
        call = _answer(chat, current, out)
        if call is None:
            return
        out.write(f"[tool call] {call['name']}({call['arguments']})\n"
                  "observation> (type the tool's result; an empty line skips) ")
        out.flush()
        result = stdin.readline().strip()
        call_msg = {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_0", "type": "function", "function": call}]}
        current += [call_msg]
        if not result:
            chat.turns.append(current)
            return
        current += [{"role": "tool", "tool_call_id": "call_0", "content": result}]


def _answer(chat: ChatSession, current: list[dict], out: TextIO) -> Optional[dict]:
    """Generate the reply to `current` (streamed); store the finished turn, or return the tool call."""
    from glm.serve.protocol import ReplyStream

    try:
        ids, dropped = chat.fit(current)
    except GLMError as e:
        out.write(f"error: {e}\n")
        return None
    if dropped:
        out.write(f"(dropped the {dropped} oldest turn{'s' if dropped > 1 else ''} to fit the "
                  f"{chat.limit()}-token window)\n")
    if len(ids) >= chat.limit():
        out.write(f"error: this message alone is {len(ids)} tokens; the window is {chat.limit()} "
                  "(shorten it, or use a shorter /system prompt or fewer /tools)\n")
        return None
    if chat.fmt == "raw" and chat.turns and not chat.told_raw:
        chat.told_raw = True
        out.write("(this model was fine-tuned on single prompts (prompt format raw): earlier turns are "
                  "prepended as plain text; /reset to ask without them)\n")
    tools = [t["function"] for t in chat.tools]
    reply = ReplyStream(tools, chat.glm3)
    printer = _Printer(chat.tok, out, reply)
    try:
        chat.generator.generate([ids], chat.gen, streamer=printer)
    except GLMError as e:
        out.write(f"error: {e}\n")
        return None
    last, call = reply.finish()
    out.write(last)
    if call:
        return call
    out.write("\n")
    chat.turns.append(current + [{"role": "assistant", "content": reply.sent}])
    return None
