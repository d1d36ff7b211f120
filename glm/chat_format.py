"""ChatGLM3's chat format: messages (system / user / assistant / observation, tools, tool calls) -> token ids.

The one builder of GLM3 chat ids, shared by training data (glm/conversations.py), predict/chat and the server:

    messages = normalize_messages([{"role": "user", "content": "..."}], tools=[...])
    ids = chat_prompt_ids(tok, messages)            # [gMASK] sop ... <|assistant|>: generation input
    ids, targets = conversation_ids(tok, messages)  # [gMASK] sop ... eos, plus which positions carry loss

A message is encoded as ChatGLM3's tokenizer `build_single_message(role, metadata, content)` does:
`[<|role|>] + sp("{metadata}\\n") + sp(content)`. Tools travel in the system turn as its content +
"\\n" + json.dumps(tools, indent=4, ensure_ascii=False) (ChatGLM3's `build_chat_input`). An assistant turn
that calls a tool has the tool name as metadata and the JSON arguments as content; the model's reply is
split back with `parse_reply`. Targets follow ChatGLM3's finetune_demo `process_batch`: every token of an
assistant message after its role token, plus the token that follows it (the next role token or eos), so the
model learns to end its turn; an assistant message with `"loss": false` carries none.

Importable without MindSpore.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from glm import GLMError

ROLES = ("system", "user", "assistant", "observation")
# ChatGLM3's own system prompt for tool use (its tool_using demo and openai_api_demo): used when a
# conversation brings tools but no system turn to carry them.
TOOL_SYSTEM_PROMPT = "Answer the following questions as best as you can. You have access to the following tools:"


class ChatFormatError(GLMError):
    """A conversation that does not fit the format; the caller adds the file and line."""


@dataclass
class Message:
    """One normalised turn: `content` is the text encoded after the metadata line."""

    role: str
    content: str
    metadata: str = ""
    loss: bool = True  # assistant turns only: False keeps the turn in the input without training on it


def _text(value: Any, what: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (dict, list)):  # tool-call arguments / tool results given as JSON values
        return json.dumps(value, ensure_ascii=False)
    raise ChatFormatError(f"{what}: expected a string or a JSON object, got {type(value).__name__}")


_TOOLS_JSON: dict[str, str] = {}  # compact JSON -> indented JSON: datasets repeat the same tools on every line


def tools_text(content: str, tools: list) -> str:
    """The system content that carries `tools`, exactly as ChatGLM3's tokenizer builds it."""
    key = json.dumps(tools, ensure_ascii=False)  # the C encoder; indent=4 takes the slow pure-Python one
    text = _TOOLS_JSON.get(key)
    if text is None:
        if len(_TOOLS_JSON) > 4096:
            _TOOLS_JSON.clear()
        text = _TOOLS_JSON[key] = json.dumps(tools, indent=4, ensure_ascii=False)
    return content + "\n" + text


def normalize_messages(conversation: Any, tools: Any = None, system: str | None = None) -> list[Message]:
    """Check a conversation and turn it into Messages; raises ChatFormatError with a one-line reason.

    `conversation`: a list of {"role", "content", "metadata"?, "loss"?, "tools"?} dicts (a system dict may
    carry its own "tools", as in ChatGLM3's history). `tools`: a list for the whole conversation (the
    finetune format's top-level "tools"), joined to the leading system turn, or to a new system turn with
    ChatGLM3's tool prompt. `system`: a system prompt to put first when the conversation has none.
    """
    if not isinstance(conversation, list):
        raise ChatFormatError(f"conversation: expected a list of messages, got {type(conversation).__name__}")
    if not conversation:
        raise ChatFormatError("empty conversation")
    if tools is not None and not isinstance(tools, list):
        raise ChatFormatError(f"tools: expected a list, got {type(tools).__name__}")
    out: list[Message] = []
    for i, item in enumerate(conversation):
        where = f"message {i + 1}"
        if not isinstance(item, dict):
            raise ChatFormatError(f"{where}: expected an object with 'role' and 'content', got {item!r:.60}")
        role = item.get("role")
        if role not in ROLES:
            raise ChatFormatError(f"{where}: unknown chat role {role!r} (expected one of {', '.join(ROLES)})")
        if "content" not in item:
            raise ChatFormatError(f"{where} ({role}): missing 'content'")
        content = _text(item["content"], f"{where} ({role}) content")
        metadata = item.get("metadata", "") or ""
        if not isinstance(metadata, str) or "\n" in metadata:
            raise ChatFormatError(f"{where} ({role}): metadata must be one line of text (a tool name), "
                                  f"got {metadata!r:.60}")
        loss = item.get("loss", True)
        if not isinstance(loss, bool):
            raise ChatFormatError(f"{where} ({role}): loss must be true or false, got {loss!r}")
        own_tools = item.get("tools")
        if own_tools is not None:
            if role != "system":
                raise ChatFormatError(f"{where} ({role}): only a system message carries tools")
            if not isinstance(own_tools, list):
                raise ChatFormatError(f"{where} (system): tools must be a list, got {type(own_tools).__name__}")
            if tools:
                raise ChatFormatError(f"{where} (system): tools given both here and for the whole conversation")
            if own_tools:
                content = tools_text(content, own_tools)
        out.append(Message(role, content, metadata, loss))
    if system is not None:
        if out[0].role == "system":
            raise ChatFormatError("two system prompts: the conversation starts with a system turn and the "
                                  "system column is set too")
        out.insert(0, Message("system", system))
    if tools:
        if out[0].role == "system":
            out[0].content = tools_text(out[0].content, tools)
        else:
            out.insert(0, Message("system", tools_text(TOOL_SYSTEM_PROMPT, tools)))
    return out


def last_assistant(messages: Sequence[Message]) -> int:
    """Index of the last assistant message; ChatFormatError when there is none."""
    for i in range(len(messages) - 1, -1, -1):
        if messages[i].role == "assistant":
            return i
    raise ChatFormatError("no assistant turn (nothing to learn or to compare with)")


class MessageEncoder:
    """Encodes many messages with one sentencepiece call; caches the metadata lines (mostly "\\n")."""

    def __init__(self, tok: Any):
        if not hasattr(tok, "role_id"):
            raise GLMError(f"the ChatGLM3 chat format needs ChatGLM3Tokenizer (role tokens), got {type(tok).__name__}")
        self.tok = tok
        self.role = {r: tok.role_id(r) for r in ROLES}
        self._meta: dict[str, list[int]] = {}

    def head(self, m: Message) -> list[int]:
        """The role token and the metadata line."""
        line = self._meta.get(m.metadata)
        if line is None:
            line = self._meta[m.metadata] = self.tok.sp.encode(f"{m.metadata}\n")
        return [self.role[m.role], *line]

    def encode(self, conversations: Sequence[Sequence[Message]]) -> list[list[list[int]]]:
        """Per conversation, per message: its build_single_message ids (each distinct text encoded once:
        system prompts and tools repeat across a dataset)."""
        unique = list(dict.fromkeys(m.content for conv in conversations for m in conv))
        body = dict(zip(unique, self.tok.sp.encode(unique)))
        return [[self.head(m) + body[m.content] for m in conv] for conv in conversations]


def chat_prompt_ids(tok: Any, messages: Sequence[Message]) -> list[int]:
    """Generation input: [gMASK] sop, every message, then <|assistant|> (ChatGLM3's build_chat_input)."""
    if messages and messages[-1].role == "assistant":
        raise ChatFormatError("the last message is the assistant's: there is nothing to answer")
    enc = MessageEncoder(tok)
    ids = list(tok.prefix)
    for part in enc.encode([messages])[0]:
        ids += part
    return ids + [enc.role["assistant"]]


def conversation_ids(tok: Any, messages: Sequence[Message]) -> tuple[list[int], list[bool]]:
    """Training ids [gMASK] sop ... eos and per position whether that token is a target (see module doc)."""
    return pack_conversation(tok, MessageEncoder(tok).encode([messages])[0], messages)


def pack_conversation(tok: Any, parts: Sequence[list[int]],
                      messages: Sequence[Message]) -> tuple[list[int], list[bool]]:
    """Join encoded messages into [gMASK] sop ... eos with the per-position target flags."""
    ids = list(tok.prefix)
    for part in parts:
        ids += part
    ids.append(tok.eos_id)
    target = [False] * len(ids)
    for start, length in target_spans(messages, [len(p) for p in parts], len(tok.prefix)):
        target[start + 1:start + length + 1] = [True] * length
    return ids, target


def target_spans(messages: Sequence[Message], lengths: Sequence[int], offset: int) -> list[tuple[int, int]]:
    """(start, length) of every learned assistant message laid out from position `offset`: its targets are
    positions start + 1 .. start + length (the tokens after its role token, then the one that follows it)."""
    spans, pos = [], offset
    for m, n in zip(messages, lengths):
        if m.role == "assistant" and m.loss:
            spans.append((pos, n))
        pos += n
    return spans


def parse_reply(text: str) -> tuple[str, str]:
    """Split a generated assistant turn into (metadata, content), as ChatGLM3's process_response.

    A plain reply has an empty metadata line; a tool call has the tool name there and the arguments after.
    """
    metadata, newline, content = text.partition("\n")
    if not newline:  # no metadata line at all (an untrained model): all of it is content
        return "", text.strip()
    return metadata.strip(), content.strip()


def reply_text(metadata: str, content: str) -> str:
    """The readable form of an assistant turn: the content, preceded by "tool\\n" for a tool call."""
    return f"{metadata}\n{content}" if metadata else content
