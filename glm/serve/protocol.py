"""The OpenAI chat-completions wire format: request models (strict: unknown fields and wrong types are
400s), messages -> prompt ids in the model's chat format, and the reply -> content or tool calls.

Only what the model can honour is accepted: a field that would change the answer and is not implemented
(n > 1, penalties, logprobs, JSON mode, a forced tool call) is a 400 naming it, never silently ignored.
"""

from __future__ import annotations

import ast
import json
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr

from glm.chat_format import ChatFormatError, chat_prompt_ids, normalize_messages, reply_text
from glm.chat_format import parse_reply as split_reply
from glm.generate import GenerationConfig
from glm.prompt_format import encode_prompt, family_format
from glm.tokenizer import ChatGLM3Tokenizer

Number = Union[StrictInt, StrictFloat]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FunctionCall(_Strict):
    name: StrictStr
    arguments: StrictStr   # JSON text, as OpenAI sends it


class ToolCall(_Strict):
    id: StrictStr = ""
    type: Literal["function"] = "function"
    function: FunctionCall


class ContentPart(_Strict):
    type: Literal["text"]
    text: StrictStr


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[StrictStr, list[ContentPart], None] = None
    name: Optional[StrictStr] = None
    tool_calls: Optional[list[ToolCall]] = None
    tool_call_id: Optional[StrictStr] = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class FunctionDef(_Strict):
    name: StrictStr = Field(min_length=1)
    description: Optional[StrictStr] = None
    parameters: Optional[dict[str, Any]] = None
    strict: Optional[StrictBool] = None


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(_Strict):
    name: StrictStr


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: NamedFunction


class StreamOptions(_Strict):
    include_usage: StrictBool = False


class ResponseFormat(_Strict):
    type: Literal["text"]


class ChatRequest(_Strict):
    model: StrictStr
    messages: list[Message] = Field(min_length=1)
    stream: StrictBool = False
    stream_options: Optional[StreamOptions] = None
    max_tokens: Optional[StrictInt] = Field(default=None, ge=1)
    max_completion_tokens: Optional[StrictInt] = Field(default=None, ge=1)
    temperature: Optional[Number] = Field(default=None, ge=0, le=2)
    top_p: Optional[Number] = Field(default=None, gt=0, le=1)
    top_k: Optional[StrictInt] = Field(default=None, ge=0)             # extension (vLLM spelling)
    repetition_penalty: Optional[Number] = Field(default=None, gt=0)    # extension (vLLM spelling)
    stop: Union[StrictStr, list[StrictStr], None] = None
    seed: Optional[StrictInt] = None
    n: StrictInt = Field(default=1, ge=1, le=1)
    tools: Optional[list[Tool]] = None
    tool_choice: Union[Literal["none", "auto"], NamedToolChoice, None] = None
    parallel_tool_calls: Optional[StrictBool] = None
    user: Optional[StrictStr] = None
    presence_penalty: Optional[Number] = Field(default=None, ge=0, le=0)
    frequency_penalty: Optional[Number] = Field(default=None, ge=0, le=0)
    logprobs: Optional[Literal[False]] = None
    response_format: Optional[ResponseFormat] = None

    def stop_strings(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4:
            raise RequestError("stop: at most 4 sequences", "stop")
        return [s for s in stops if s]


class RequestError(Exception):
    """A request the model cannot serve as asked: 400 with `message` naming `param`."""

    def __init__(self, message: str, param: Optional[str] = None, status: int = 400,
                 kind: str = "invalid_request_error", code: Optional[str] = None):
        super().__init__(message)
        self.message, self.param, self.status, self.kind, self.code = message, param, status, kind, code


def error_body(message: str, kind: str = "invalid_request_error", param: Optional[str] = None,
               code: Optional[str] = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


# ----------------------------------------------------------------------------------------- generation
def generation_settings(req: ChatRequest, default: GenerationConfig) -> GenerationConfig:
    """The config's generation settings, overridden by what the request sets (OpenAI semantics:
    temperature 0 = greedy, max_tokens = new tokens)."""
    gen = GenerationConfig(**{**default.__dict__, "eos_token_id": list(default.eos_token_id)})
    if req.temperature is not None:
        gen.do_sample = req.temperature > 0
        if gen.do_sample:
            gen.temperature = float(req.temperature)
    elif req.top_p is not None and req.top_p < 1:
        gen.do_sample = True
    if req.top_p is not None:
        gen.top_p = float(req.top_p)
    if req.top_k is not None:
        gen.top_k = req.top_k
    elif gen.do_sample and gen.top_k == 1:
        gen.top_k = 0       # top_k 1 is how the reference YAMLs spell greedy; a sampling request wants sampling
    if gen.do_sample and gen.top_k == 1:
        gen.do_sample = False
    if req.repetition_penalty is not None:
        gen.repetition_penalty = float(req.repetition_penalty)
    limit = req.max_completion_tokens or req.max_tokens
    if limit is not None:
        gen.max_new_tokens, gen.max_length = limit, None
    if req.seed is not None:
        gen.seed = req.seed
    return gen


# ------------------------------------------------------------------------------------------- prompts
def _tools_for(req: ChatRequest) -> list[dict]:
    if not req.tools or req.tool_choice == "none":
        return []
    tools = [t.function.model_dump(exclude_none=True) for t in req.tools]
    if isinstance(req.tool_choice, NamedToolChoice):
        name = req.tool_choice.function.name
        tools = [t for t in tools if t["name"] == name]
        if not tools:
            raise RequestError(f"tool_choice names {name!r}, which is not in tools", "tool_choice")
    return tools


def encode_messages(tok, req: ChatRequest, fmt: Optional[str] = None) -> tuple[list[int], list[dict]]:
    """Prompt ids for the conversation in prompt format `fmt` (glm/prompt_format.py; default: the tokenizer's
    chat template) and the tools offered (glm3_chat only).

    glm3_chat: role tokens, tools and tool results. glm2: "[Round n]" rounds. raw (data_loader version 3):
    the model knows no turns, so earlier turns are prepended as plain text, as `encode_prompt` does."""
    msgs = req.messages
    if msgs[-1].role not in ("user", "tool"):
        raise RequestError(f"messages: the last message must be from the user or a tool, got {msgs[-1].role!r}",
                           "messages")
    fmt = fmt or family_format(tok)
    if fmt == "glm3_chat":
        return _encode_glm3(tok, req)
    if req.tools:
        raise RequestError(f"tools: tool calls need the glm3_chat prompt format (this model uses {fmt})", "tools")
    query, pairs = _rounds(msgs, fmt)
    return encode_prompt(tok, fmt, query, pairs), []


def _rounds(msgs: list[Message], fmt: str) -> tuple[str, list[tuple[str, str]]]:
    """(last question, earlier (question, answer) rounds): glm2 and raw have no system role, so system text
    opens the first question."""
    system, pairs, query = [], [], None
    for i, m in enumerate(msgs):
        if m.role in ("system", "developer"):
            system.append(m.text())
        elif m.role == "tool":
            raise RequestError(f"messages[{i}]: tool messages need the glm3_chat prompt format (this model "
                               f"uses {fmt})", "messages")
        elif m.role == "user":
            query = m.text() if query is None else query + "\n" + m.text()
        elif query is None:
            raise RequestError(f"messages[{i}]: an assistant message must follow a user message", "messages")
        else:
            pairs.append((query, m.text()))
            query = None
    if system:
        first = pairs[0][0] if pairs else query
        first = "\n".join(system) + "\n\n" + first
        if pairs:
            pairs[0] = (first, pairs[0][1])
        else:
            query = first
    return query, pairs


def _encode_glm3(tok: ChatGLM3Tokenizer, req: ChatRequest) -> tuple[list[int], list[dict]]:
    """OpenAI messages -> glm.chat_format messages (the builder training and predict use): a tool call is an
    assistant turn with the tool name as metadata and the JSON arguments as content; a tool result is an
    observation; the tools join the system turn (or ChatGLM3's tool prompt)."""
    tools = _tools_for(req)
    conversation: list[dict] = []
    for i, m in enumerate(req.messages):
        if m.role in ("system", "developer"):
            conversation.append({"role": "system", "content": m.text()})
        elif m.role == "user":
            conversation.append({"role": "user", "content": m.text()})
        elif m.role == "tool":
            conversation.append({"role": "observation", "content": m.text()})
        elif m.tool_calls:
            if m.text():
                conversation.append({"role": "assistant", "content": m.text()})
            for call in m.tool_calls:
                try:
                    args = json.loads(call.function.arguments or "{}")
                except ValueError:
                    raise RequestError(f"messages[{i}].tool_calls: arguments of {call.function.name!r} are not "
                                       "valid JSON", "messages") from None
                if not isinstance(args, dict):
                    raise RequestError(f"messages[{i}].tool_calls: arguments must be a JSON object", "messages")
                conversation.append({"role": "assistant", "metadata": call.function.name,
                                     "content": json.dumps(args, ensure_ascii=False)})
        else:
            conversation.append({"role": "assistant", "content": m.text()})
    try:
        return chat_prompt_ids(tok, normalize_messages(conversation, tools=tools or None)), tools
    except ChatFormatError as e:
        raise RequestError(f"messages: {e}", "messages") from None


def tool_arguments(body: str) -> Optional[dict]:
    """The arguments of a tool call's content: a JSON object (this project's format), or ChatGLM3's
    "```python\ntool_call(a=1)\n```" (literals only: nothing is evaluated); None if neither."""
    body = body.strip()
    if body.startswith("```"):
        body = body.split("\n", 1)[1] if "\n" in body else ""
        body = body.rsplit("```", 1)[0].strip()
    if body.startswith("{"):
        try:
            value = json.loads(body)
        except ValueError:
            return None
        return value if isinstance(value, dict) else None
    try:
        node = ast.parse(body, mode="eval").body
    except SyntaxError:
        return None
    if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and not node.args):
        return None
    try:
        return {kw.arg: ast.literal_eval(kw.value) for kw in node.keywords if kw.arg}
    except ValueError:
        return None


def parse_reply(text: str, tools: list[dict], glm3: bool) -> tuple[str, Optional[dict]]:
    """(content, tool call {"name", "arguments"} or None) of a finished reply. GLM2 text is returned as
    generated (as --run_mode predict prints it); GLM3 text loses its metadata line (glm.chat_format)."""
    if not glm3:
        return text, None
    name, body = split_reply(text)
    if name and name in {t["name"] for t in tools}:
        args = tool_arguments(body)
        if args is not None:
            return "", {"name": name, "arguments": json.dumps(args, ensure_ascii=False)}
    return reply_text(name, body), None


class ReplyStream:
    """Turns the raw text pieces of a reply into the content deltas a client sees, so that the deltas add
    up to `parse_reply`'s content. GLM3 text that may still turn out to be a tool call (its first line is a
    prefix of an offered tool name) is held back until that is decided."""

    def __init__(self, tools: list[dict], glm3: bool):
        self.names = [t["name"] for t in tools]
        self.glm3 = glm3
        self.raw, self.sent = "", ""

    def feed(self, piece: str) -> str:
        self.raw += piece
        if not self.glm3:
            visible = self.raw
        else:
            head, newline, _ = self.raw.partition("\n")
            head = head.strip()
            if newline:
                maybe_call = head in self.names
            else:
                maybe_call = any(n.startswith(head) for n in self.names)
            if maybe_call:
                return ""
            # The final content, less a trailing blank that may still be stripped away.
            visible = parse_reply(self.raw, [], True)[0].rstrip()
        return self._delta(visible)

    def finish(self) -> tuple[str, Optional[dict]]:
        """The last content delta and the tool call, if the reply was one."""
        content, call = parse_reply(self.raw, [{"name": n} for n in self.names], self.glm3)
        return ("" if call else self._delta(content)), call

    def _delta(self, visible: str) -> str:
        if not visible.startswith(self.sent):   # cannot happen for prefix-stable text; never resend
            return ""
        delta, self.sent = visible[len(self.sent):], visible
        return delta
