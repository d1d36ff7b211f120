"""ChatGLM3 conversation data (`data_loader.format: conversations`): reading, checking and packing.

A line is `{"conversations": [{"role", "content", "metadata"?, "loss"?}, ...], "tools": [...]}` (the key names
come from data_loader.columns). Messages are encoded by glm.chat_format, the builder chat and serve use too.

Train samples: `[gMASK] sop <messages> eos`, right-padded to L = max_source_length + max_target_length + 1,
labels pre-shifted (labels[t] = input_ids[t+1]) and -100 except where input_ids[t+1] is a target (every token
of an assistant turn after its role token, plus the token that follows the turn). A conversation longer than
L loses its earliest rounds first (a round starts at a user turn; a leading system turn, which carries the
tools, stays); if it is still too long, the end is cut and eos appended, but never before the first token of
the last assistant reply: such a line is skipped (train) or an error (eval).

Eval samples: the prompt is the conversation up to the last assistant turn plus its role token (earliest
rounds dropped to fit max_source_length); the reference is that turn (`reply_text`: "tool\\n{args}" for a
tool call), labels its tokens.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from glm import GLMError
from glm.chat_format import (
    ChatFormatError,
    Message,
    MessageEncoder,
    last_assistant,
    normalize_messages,
    reply_text,
    target_spans,
)
from glm.data import IGNORE_INDEX, SKIP_REASONS, Record, parse_line, percentiles, read_lines, warn_skipped

CHAT_SKIP_REASONS = (*SKIP_REASONS, "bad_conversation", "too_long")


def read_conversations(path: str | Path, columns: dict, *, strict: bool = False,
                       warn: bool = True) -> tuple[list[Record], dict]:
    """Read a conversations JSON-lines file into Records (with `.messages`); returns (records, counts).

    A row that does not fit (no conversations key, unknown role, no assistant turn, tools not a list, empty
    conversation, ...) is skipped with a warning naming its line, or with `strict` (eval) raises a one-line
    GLMError naming it. Blank and invalid-JSON lines are skipped in both, as for ADGEN.
    """
    conv_key, tools_key, system_key = columns["conversations"], columns["tools"], columns.get("system")
    lines = read_lines(path)
    records: list[Record] = []
    skipped: dict[str, list[int]] = {r: [] for r in CHAT_SKIP_REASONS}
    problems: list[tuple[int, str]] = []
    for no, line in enumerate(lines, 1):
        obj = parse_line(line)
        if isinstance(obj, str):
            skipped[obj].append(no)
            continue
        try:
            if conv_key not in obj:
                raise ChatFormatError(f"no {conv_key!r} key (keys: {', '.join(map(repr, list(obj)[:6]))})")
            system = obj.get(system_key) if system_key else None
            if system is not None and not isinstance(system, str):
                raise ChatFormatError(f"{system_key!r}: expected a string, got {type(system).__name__}")
            messages = normalize_messages(obj[conv_key], obj.get(tools_key), system)
            k = last_assistant(messages)
        except ChatFormatError as e:
            if strict:
                raise GLMError(f"dataset file {str(path)!r} line {no}: {e}") from None
            skipped["bad_conversation"].append(no)
            problems.append((no, str(e)))
            continue
        answer = reply_text(messages[k].metadata, messages[k].content)
        if strict and not answer.strip():
            raise GLMError(f"dataset file {str(path)!r} line {no}: the last assistant turn is empty; eval scores "
                           "every line against it: fill it in or remove the line")
        asked = next((m.content for m in reversed(messages[:k]) if m.role != "system"), "")
        records.append(Record(asked, answer, no, messages=messages))
    if warn:
        warn_skipped(path, len(lines), skipped, problems)
    if not records:
        raise GLMError(f"dataset file {str(path)!r}: no usable conversation ({len(lines)} lines read; expected "
                       f"lines like {{{conv_key!r}: [{{\"role\": \"user\", \"content\": ...}}, "
                       f"{{\"role\": \"assistant\", \"content\": ...}}]}})")
    return records, {"lines_read": len(lines), "skipped": {k: len(v) for k, v in skipped.items()}}


def _round_bounds(messages: Sequence[Message], stop: int) -> list[int]:
    """[b0, ..., bn]: the droppable rounds [b_i, b_i+1) before the round of message `stop`, which starts at bn.

    A round starts at a user turn; a leading system turn (it carries the tools) is never dropped.
    """
    first = 1 if messages[0].role == "system" else 0
    users = [i for i in range(first, stop + 1) if messages[i].role == "user"]
    last = users[-1] if users else first
    if last <= first:
        return []
    return [first] + [i for i in users if first < i < last] + [last]


def _drop_earliest(lens: Sequence[int], messages: Sequence[Message], stop: int, budget: int,
                   fixed: int) -> tuple[list[int], int]:
    """Messages 0..stop kept so that fixed + their lengths <= budget, dropping whole rounds from the earliest
    (as far as that helps; `stop`'s round always stays); returns (kept indices, number of messages dropped)."""
    keep = list(range(stop + 1))
    total = fixed + sum(lens[: stop + 1])
    bounds = _round_bounds(messages, stop)
    dropped: set[int] = set()
    for a, b in zip(bounds, bounds[1:]):
        if total <= budget:
            break
        dropped.update(range(a, b))
        total -= sum(lens[a:b])
    return [i for i in keep if i not in dropped], len(dropped)


def preprocess_conversations_train(tok, records: Sequence[Record], max_source_length: int, max_target_length: int,
                                   ignore_pad_token_for_loss: bool = True) -> tuple[dict[str, np.ndarray], dict, list[int]]:
    """Train samples (see the module doc); returns (arrays, stats, indices of the records that fit)."""
    seq_len = max_source_length + max_target_length + 1
    enc = MessageEncoder(tok)
    parts_all = enc.encode([r.messages for r in records])
    n_prefix, eos = len(tok.prefix), tok.eos_id
    input_ids = np.full((len(records), seq_len), tok.pad_id, dtype=np.int32)
    labels = np.full((len(records), seq_len), IGNORE_INDEX if ignore_pad_token_for_loss else tok.pad_id,
                     dtype=np.int32)
    kept_records, too_long = [], []
    src_len, tgt_len = [], []
    n = dropped_turns = with_drops = cut = 0
    for idx, (r, parts) in enumerate(zip(records, parts_all)):
        msgs = r.messages
        k = last_assistant(msgs)
        lens = [len(p) for p in parts]
        head_k = len(enc.head(msgs[k]))
        src_len.append(n_prefix + sum(lens[:k]) + head_k)
        tgt_len.append(lens[k] - head_k + 1)
        keep, dropped = range(len(msgs)), 0
        if n_prefix + sum(lens) + 1 > seq_len:
            keep, dropped = _drop_earliest(lens, msgs, k, seq_len - sum(lens[k + 1:]), n_prefix + 1)
            keep += list(range(k + 1, len(msgs)))
        ids, start_k = list(tok.prefix), 0
        for i in keep:
            if i == k:
                start_k = len(ids)
            ids += parts[i]
        ids.append(eos)
        # A cut keeps seq_len - 1 tokens then eos: it must leave the last reply's first token.
        if start_k + head_k + min(1, lens[k] - head_k) + 1 > seq_len:
            too_long.append(r.line)
            continue
        if len(ids) > seq_len:
            cut += start_k + lens[k] + 1 > seq_len  # the last reply itself lost tokens
            ids = ids[:seq_len - 1] + [eos]
        a = np.asarray(ids, dtype=np.int32)
        input_ids[n, :len(a)] = a
        lab = labels[n]
        lab[:len(a) - 1] = IGNORE_INDEX  # the sequence's own non-targets, whatever ignore_pad_token_for_loss says
        # Pre-shifted: labels[t] is input t+1's target.
        for start, length in target_spans([msgs[i] for i in keep], [lens[i] for i in keep], n_prefix):
            end = min(start + length, len(a) - 1)
            lab[start:end] = a[start + 1:end + 1]
        dropped_turns += dropped
        with_drops += dropped > 0
        kept_records.append(idx)
        n += 1
    input_ids, labels = input_ids[:n], labels[:n]
    src, tgt = np.asarray(src_len, dtype=np.int64), np.asarray(tgt_len, dtype=np.int64)
    stats = {"samples": n, "truncated_source": with_drops, "truncated_target": int(cut),
             "dropped_turns": dropped_turns, "samples_with_dropped_turns": with_drops,
             "source_tokens": percentiles(src), "target_tokens": percentiles(tgt), "too_long_lines": too_long}
    return {"input_ids": input_ids, "labels": labels}, stats, kept_records


def preprocess_conversations_eval(tok, records: Sequence[Record], max_source_length: int, max_target_length: int,
                                  path: str | Path = "") -> tuple[dict[str, np.ndarray], dict]:
    """Eval samples: prompt = the conversation before the last assistant turn + <|assistant|>, labels = that turn."""
    enc = MessageEncoder(tok)
    assistant = enc.role["assistant"]
    parts_all = enc.encode([r.messages for r in records])
    targets = tok.sp.encode([r.answer for r in records])
    n = len(records)
    input_ids = np.full((n, max_source_length), tok.pad_id, dtype=np.int32)
    labels = np.full((n, max_target_length), tok.pad_id, dtype=np.int32)
    src_len, tgt_len = np.empty(n, dtype=np.int64), np.empty(n, dtype=np.int64)
    dropped_turns = with_drops = 0
    for i, (r, parts, t) in enumerate(zip(records, parts_all, targets)):
        k = last_assistant(r.messages)
        lens = [len(p) for p in parts[:k]] + [0]
        fixed = len(tok.prefix) + 1
        src_len[i], tgt_len[i] = fixed + sum(lens), len(t)
        keep, dropped = _drop_earliest(lens, r.messages, k, max_source_length, fixed)
        ids = list(tok.prefix) + [x for j in keep if j < k for x in parts[j]] + [assistant]
        if len(ids) > max_source_length:
            raise GLMError(f"dataset file {str(path)!r} line {r.line}: the prompt of the last assistant turn needs "
                           f"{len(ids)} tokens even without earlier rounds; raise max_source_length "
                           f"({max_source_length}) or shorten the line")
        dropped_turns += dropped
        with_drops += dropped > 0
        input_ids[i, :len(ids)] = ids
        labels[i, :min(len(t), max_target_length)] = t[:max_target_length]
    stats = {"samples": n, "truncated_source": with_drops, "truncated_target": int((tgt_len > max_target_length).sum()),
             "dropped_turns": dropped_turns, "samples_with_dropped_turns": with_drops,
             "source_tokens": percentiles(src_len), "target_tokens": percentiles(tgt_len)}
    return {"input_ids": input_ids, "labels": labels, "index": np.arange(n, dtype=np.int32)}, stats


def load_conversations(path: str | Path, tok, *, phase: str, max_source_length: int, max_target_length: int,
                       columns: dict, ignore_pad_token_for_loss: bool = True
                       ) -> tuple[list[Record], dict[str, np.ndarray], dict]:
    """Read and preprocess a conversations file once: returns (records, numpy samples, stats)."""
    if phase not in ("train", "eval"):
        raise GLMError(f"data_loader.phase: expected 'train' or 'eval', got {phase!r}")
    if not hasattr(tok, "role_id"):
        raise GLMError(f"data_loader.format conversations needs the ChatGLM3Tokenizer (role tokens), "
                       f"got {type(tok).__name__}")
    records, counts = read_conversations(path, columns, strict=phase == "eval")
    if phase == "train":
        samples, lstats, kept = preprocess_conversations_train(tok, records, max_source_length, max_target_length,
                                                               ignore_pad_token_for_loss)
        too_long = lstats.pop("too_long_lines")
        counts["skipped"]["too_long"] = len(too_long)
        if too_long:
            print(f"warning: {path}: skipped {len(too_long)} conversations whose last assistant reply does not "
                  f"start within max_source_length + max_target_length + 1 = {max_source_length + max_target_length + 1}"
                  f" tokens even without earlier rounds; first at lines {', '.join(map(str, too_long[:5]))}",
                  file=sys.stderr)
        records = [records[i] for i in kept]
        if not records:
            raise GLMError(f"dataset file {str(path)!r}: no conversation fits in "
                           f"{max_source_length + max_target_length + 1} tokens")
    else:
        samples, lstats = preprocess_conversations_eval(tok, records, max_source_length, max_target_length, path)
    stats = {"file": str(path), "phase": phase, "format": "conversations", **counts,
             "max_source_length": max_source_length, "max_target_length": max_target_length, **lstats}
    return records, samples, stats


@dataclass
class ChatPrompt:
    """A conversation to answer: `messages` end before the last assistant turn, `reference` is that turn."""

    line: int
    messages: list[Message]
    reference: str | None


def read_chat_prompts(path: str | Path, columns: dict | None = None) -> list[ChatPrompt] | None:
    """The conversations of a JSON-lines predict file, or None when its first row holds no conversation.

    A line ending with an assistant turn is answered from the turns before it (that turn is the reference);
    a line ending with a user or observation turn is answered as it stands. A line that does not fit is a
    one-line GLMError naming it.
    """
    columns = columns or {"conversations": "conversations", "tools": "tools"}
    if Path(path).suffix not in (".json", ".jsonl"):
        return None
    try:
        lines = read_lines(path)
    except GLMError:
        return None  # empty or not UTF-8: the plain prompt reader reports it
    rows = [(no, parse_line(line)) for no, line in enumerate(lines, 1) if line.strip()]
    if not rows or not isinstance(rows[0][1], dict) or columns["conversations"] not in rows[0][1]:
        return None
    out = []
    for no, obj in rows:
        try:
            if isinstance(obj, str):
                raise ChatFormatError("not a JSON object")
            if columns["conversations"] not in obj:
                raise ChatFormatError(f"no {columns['conversations']!r} key")
            messages = normalize_messages(obj[columns["conversations"]], obj.get(columns["tools"]))
            if messages[-1].role == "assistant":
                k = last_assistant(messages)
                out.append(ChatPrompt(no, messages[:k], reply_text(messages[k].metadata, messages[k].content)))
            else:
                out.append(ChatPrompt(no, messages, None))
        except ChatFormatError as e:
            raise GLMError(f"--predict_data {path} line {no}: {e}") from None
    return out
