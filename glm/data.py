"""ADGEN (AdvertiseGen) data: JSON-lines loading, KeyWordGen preprocessing and statistics.

Pure Python/numpy; the MindSpore pipeline lives in glm/dataset.py (`build_dataset`, re-exported here).
Preprocessing follows MindFormers' KeyWordGenDataset (versions 2 and 3) with these deliberate changes:
labels are masked to -100 by position (not by value), eval labels carry no [gMASK] sop prefix, and eval
version 3 exists (raw content, no template).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from glm import GLMError
from glm.tokenizer import ChatGLM2Tokenizer, GLMTokenizer

IGNORE_INDEX = -100
SKIP_REASONS = ("blank_line", "invalid_json", "missing_key", "wrong_type", "empty_value")


@dataclass
class Record:
    """One raw example: `prompt` is the content column, `answer` the summary column, `line` is 1-based.

    `history`: earlier (query, response) rounds (the history column); `messages`: a whole ChatGLM3
    conversation (format conversations), whose last assistant turn is `answer`.
    """

    prompt: str
    answer: str
    line: int
    history: list[tuple[str, str]] | None = None
    messages: list | None = None


FORMATS = ("adgen", "conversations")
COLUMN_DEFAULTS = {"adgen": {"history": None}, "conversations": {"conversations": "conversations", "tools": "tools",
                                                                   "system": None}}


def resolve_columns(fmt: str, origin_columns: Sequence[str], columns: dict | None, where: str) -> dict[str, str | None]:
    """The JSON key of each field for `fmt`: data_loader.columns wins, then origin_columns, then the defaults.

    A key set for a field the format does not use is an error rather than silently ignored.
    """
    if fmt not in FORMATS:
        raise GLMError(f"{where}.format: expected one of {list(FORMATS)}, got {fmt!r}")
    given = {k: v for k, v in (columns or {}).items() if v is not None}
    if fmt == "adgen":
        if len(origin_columns) != 2:
            raise GLMError(f"{where}.origin_columns: expected 2 column names [prompt, answer], "
                           f"got {list(origin_columns)}")
        out = {"prompt": origin_columns[0], "response": origin_columns[1], **COLUMN_DEFAULTS[fmt]}
    else:
        out = dict(COLUMN_DEFAULTS[fmt])
    for key, value in given.items():
        if key not in out:
            hint = ("; ChatGLM2's [Round n] prompt has no system turn: use format: conversations"
                    if key == "system" else f" (format {fmt!r} uses {sorted(out)})")
            raise GLMError(f"{where}.columns.{key}: not used by format {fmt!r}{hint}")
        if not isinstance(value, str) or not value:
            raise GLMError(f"{where}.columns.{key}: expected a JSON key name, got {value!r}")
        out[key] = value
    return out


def read_lines(path: str | Path) -> list[str]:
    """The lines of a UTF-8 JSON-lines file (BOM, CRLF tolerated); file-level problems raise GLMError."""
    path = Path(path)
    if not path.exists():
        raise GLMError(f"dataset file {str(path)!r} does not exist")
    if path.is_dir():
        raise GLMError(f"dataset_dir {str(path)!r} is a directory; expected a JSON-lines file such as train.json")
    if not path.is_file():   # a FIFO or a device would block or never end
        raise GLMError(f"dataset_dir {str(path)!r} is not a regular file (a FIFO, socket or device); expected a "
                       "JSON-lines file such as train.json")
    raw = path.read_bytes()
    if not raw.strip():
        raise GLMError(f"dataset file {str(path)!r} is empty")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise GLMError(f"dataset file {str(path)!r} line {line}: not valid UTF-8 (byte {e.start}); "
                       "re-encode the file as UTF-8 (ADGEN's train.json is often GBK)") from None
    text = text.removeprefix("\ufeff")
    # Split on "\n" only: str.splitlines() would also break at U+2028/U+0085, which JSON strings may hold raw.
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    return [line.removesuffix("\r") for line in lines]


def parse_line(line: str) -> dict | str:
    """A JSON object, or the skip reason ("blank_line" / "invalid_json")."""
    if not line.strip():
        return "blank_line"
    try:
        obj = json.loads(line, strict=False)
    except json.JSONDecodeError:
        return "invalid_json"
    return obj if isinstance(obj, dict) else "invalid_json"


def warn_skipped(path: str | Path, n_lines: int, skipped: dict[str, list[int]],
                 problems: Sequence[tuple[int, str]] = ()) -> None:
    """One warning line for the skipped lines, plus one per row-level problem (at most 5), naming the line."""
    for no, why in problems[:5]:
        print(f"warning: {path} line {no}: {why}; line skipped", file=sys.stderr)
    if len(problems) > 5:
        print(f"warning: {path}: {len(problems) - 5} more lines skipped for such problems", file=sys.stderr)
    n_skipped = sum(len(v) for v in skipped.values())
    if n_skipped:
        first = sorted(no for v in skipped.values() for no in v)[:5]
        detail = ", ".join(f"{k} {len(v)}" for k, v in skipped.items() if v)
        print(f"warning: {path}: skipped {n_skipped} of {n_lines} lines ({detail}); first at lines "
              f"{', '.join(map(str, first))}", file=sys.stderr)


def read_jsonl(path: str | Path, origin_columns: Sequence[str] = ("content", "summary"),
               warn: bool = True, require_answer: bool = False,
               history_column: str | None = None) -> tuple[list[Record], dict]:
    """Read an ADGEN-style JSON-lines file into records; returns (records, counts).

    Unusable lines (blank, invalid JSON, missing key, empty value) are skipped with one warning line;
    file-level problems and a file with no usable line raise GLMError. With `require_answer` (eval-phase
    data, whose answer is the metric's reference) an empty answer is a GLMError naming the line instead:
    skipping it would silently score a different set of samples. `history_column` names a key holding
    [[query, response], ...] (ChatGLM2's dialogue history); a value that is not such a list is a skipped line
    with a warning naming it (train) or a GLMError naming it (eval).
    """
    if len(origin_columns) != 2:
        raise GLMError(f"data_loader.origin_columns: expected 2 column names [prompt, answer], got {list(origin_columns)}")
    lines = read_lines(path)
    path = Path(path)
    key_p, key_a = origin_columns
    records: list[Record] = []
    skipped: dict[str, list[int]] = {r: [] for r in SKIP_REASONS}
    problems: list[tuple[int, str]] = []
    for no, line in enumerate(lines, 1):
        obj = parse_line(line)
        if isinstance(obj, str):
            skipped[obj].append(no)
        elif key_p not in obj or key_a not in obj:
            if require_answer:  # eval scores every line: a row that does not fit the columns is an error
                missing = " and ".join(repr(k) for k in (key_p, key_a) if k not in obj)
                raise GLMError(f"dataset file {str(path)!r} line {no}: no {missing} key (the line has "
                               f"{', '.join(map(repr, list(obj)[:6])) or 'no keys'}); set data_loader.columns "
                               "(prompt/response) or origin_columns to the file's keys")
            skipped["missing_key"].append(no)
        elif not all(isinstance(obj[k], str) for k in (key_p, key_a)):
            bad = next(k for k in (key_p, key_a) if not isinstance(obj[k], str))
            if require_answer and bad == key_a:
                raise GLMError(f"dataset file {str(path)!r} line {no}: {bad!r} is a {_json_type(obj[bad])} "
                               f"({obj[bad]!r:.40}), expected text")
            skipped["wrong_type"].append(no)
        elif require_answer and not _nonblank(obj[key_a]):
            raise GLMError(f"dataset file {str(path)!r} line {no}: empty reference ({key_a!r} is {obj[key_a]!r:.40}); "
                           "eval scores every line against its reference: fill it in or remove the line")
        elif not _nonblank(obj[key_p]) or not _nonblank(obj[key_a]):
            skipped["empty_value"].append(no)
        else:
            history = None
            if history_column is not None:
                history, why = _history(obj.get(history_column, []), history_column)
                if why:
                    if require_answer:
                        raise GLMError(f"dataset file {str(path)!r} line {no}: {why}")
                    skipped.setdefault("bad_history", []).append(no)
                    problems.append((no, why))
                    continue
            records.append(Record(obj[key_p], obj[key_a], no, history))

    if warn:
        warn_skipped(path, len(lines), skipped, problems)
    if not records:
        hint = ""
        first = next((o for o in map(parse_line, lines) if isinstance(o, dict)), None)
        if first is not None and "conversations" in first and key_p not in first:
            hint = "; the rows hold 'conversations': set data_loader.format: conversations"
        raise GLMError(f"dataset file {str(path)!r}: no valid line with non-empty {key_p!r} and {key_a!r} "
                       f"({len(lines)} lines read){hint}")
    first_row = parse_line(lines[records[0].line - 1])
    if history_column is None and warn and "history" in first_row:
        print(f"warning: {path}: the rows have a 'history' key, which is not used: set "
              "data_loader.columns.history: history to build the [Round n] prompt from it", file=sys.stderr)
    counts = {"lines_read": len(lines), "skipped": {k: len(v) for k, v in skipped.items()}}
    return records, counts


def _json_type(value: object) -> str:
    return {bool: "boolean", int: "number", float: "number", list: "list", dict: "object",
            type(None): "null"}.get(type(value), type(value).__name__)


def _history(value: object, key: str) -> tuple[list[tuple[str, str]], str]:
    """(pairs, "") for a valid history value (null = none), else ([], why)."""
    if value is None:
        return [], ""
    if not isinstance(value, list):
        return [], f"{key!r} must be a list of [query, response] pairs, got {type(value).__name__}"
    pairs = []
    for i, item in enumerate(value):
        if not (isinstance(item, (list, tuple)) and len(item) == 2 and all(isinstance(x, str) for x in item)):
            return [], f"{key!r} item {i + 1} must be a [query, response] pair of strings, got {item!r:.60}"
        pairs.append((item[0], item[1]))
    return pairs, ""


def _nonblank(value: object) -> bool:
    return isinstance(value, str) and bool(value.strip())


def _source_texts(tokenizer: GLMTokenizer, records: Sequence[Record], version: int) -> list[str]:
    if version == 2:
        # v2 wraps content in the ChatGLM2 "[Round n] 问：… 答：" template (earlier rounds from the history
        # column), for GLM3 as well (as the reference).
        return [ChatGLM2Tokenizer.build_prompt(r.prompt, r.history) for r in records]
    if version == 3:
        if any(r.history for r in records):
            raise GLMError("data_loader.version 3 (raw content, no template) cannot show a dialogue history: use "
                           "version 2 ([Round n] prompt) or format: conversations (ChatGLM3 role tokens)")
        return [r.prompt for r in records]
    raise GLMError(f"data_loader.version: expected 2 or 3, got {version!r} (version 1 is the GLM-1 format)")


def _encode_sources(tokenizer: GLMTokenizer, records: Sequence[Record], version: int,
                    room: int) -> tuple[list[list[int]], list[int], int]:
    """Token ids of each record's prompt text; returns (ids, lengths before dropping rounds, rounds dropped).

    Deliberate deviation: with a dialogue history, THUDM's ptuning cuts the "[Round n]" prompt from the
    right, which drops the current question first; here the earliest rounds go first until the prompt fits.
    """
    sources = tokenizer.sp.encode(_source_texts(tokenizer, records, version))
    full = [len(s) for s in sources]
    dropped = 0
    for i, r in enumerate(records):
        history = list(r.history or [])
        while len(sources[i]) > room and history:
            history.pop(0)
            dropped += 1
            sources[i] = tokenizer.sp.encode(ChatGLM2Tokenizer.build_prompt(r.prompt, history))
    return sources, full, dropped


def percentiles(lengths: np.ndarray) -> dict:
    if lengths.size == 0:
        return {"p50": 0, "p90": 0, "p99": 0, "max": 0}
    p = np.percentile(lengths, [50, 90, 99])
    return {"p50": int(p[0]), "p90": int(p[1]), "p99": int(p[2]), "max": int(lengths.max())}


def _length_stats(src_len: np.ndarray, tgt_len: np.ndarray, max_src: int, max_tgt: int) -> dict:
    """Counts over token lengths before truncation (`*_len` already include the 2 prefix tokens for source)."""
    return {
        "samples": int(src_len.size),
        "truncated_source": int((src_len > max_src).sum()),
        "truncated_target": int((tgt_len > max_tgt).sum()),
        "source_tokens": percentiles(src_len),
        "target_tokens": percentiles(tgt_len),
    }


def preprocess_train(tokenizer: GLMTokenizer, records: Sequence[Record], max_source_length: int,
                     max_target_length: int, version: int = 2,
                     ignore_pad_token_for_loss: bool = True) -> tuple[dict[str, np.ndarray], dict]:
    """KeyWordGen train samples: input_ids = a + b + [eos] + pad, labels pre-shifted (labels[t] = input_ids[t+1]).

    a = [gMASK, sop, *prompt][:max_source], b = summary[:max_target]; both arrays are int32 [N, L] with
    L = max_source + max_target + 1. Returns ({"input_ids", "labels"}, length stats).
    """
    if max_source_length < len(tokenizer.prefix) + 1 or max_target_length < 1:
        raise GLMError(f"max_source_length must be >= {len(tokenizer.prefix) + 1} and max_target_length >= 1, "
                       f"got {max_source_length} and {max_target_length}")
    seq_len = max_source_length + max_target_length + 1
    sources, full, dropped = _encode_sources(tokenizer, records, version, max_source_length - len(tokenizer.prefix))
    targets = tokenizer.sp.encode([r.answer for r in records])
    n, prefix, eos = len(records), tokenizer.prefix, tokenizer.eos_id
    input_ids = np.full((n, seq_len), tokenizer.pad_id, dtype=np.int32)
    # Positions past the answer are padding: masked by position, so a real id equal to pad_id (0 = <unk>) in
    # the answer still counts. Without ignore_pad_token_for_loss the reference trains on pad (0) labels.
    labels = np.full((n, seq_len), IGNORE_INDEX if ignore_pad_token_for_loss else tokenizer.pad_id, dtype=np.int32)
    src_len = np.empty(n, dtype=np.int64)
    tgt_len = np.empty(n, dtype=np.int64)
    room = max_source_length - len(prefix)
    for i, (s, t) in enumerate(zip(sources, targets)):
        src_len[i], tgt_len[i] = full[i] + len(prefix), len(t)
        a = prefix + s[:room]
        b = t[:max_target_length] + [eos]  # eos survives truncation: it is added after cutting b
        la, lb = len(a), len(b)
        input_ids[i, :la] = a
        input_ids[i, la:la + lb] = b
        labels[i, :la - 1] = IGNORE_INDEX  # the prompt is never predicted, whatever the flag says
        labels[i, la - 1:la - 1 + lb] = b
    stats = _length_stats(src_len, tgt_len, max_source_length, max_target_length)
    if any(r.history for r in records):
        stats["dropped_rounds"] = dropped
    return {"input_ids": input_ids, "labels": labels}, stats


def preprocess_eval(tokenizer: GLMTokenizer, records: Sequence[Record], max_source_length: int,
                    max_target_length: int, version: int = 2) -> tuple[dict[str, np.ndarray], dict]:
    """KeyWordGen eval samples: input_ids [N, max_source] (prompt, right-padded), labels [N, max_target].

    Returns ({"input_ids", "labels", "index"}, length stats). `index` points into the records so the metric
    can use the raw answer text.
    """
    if max_source_length < len(tokenizer.prefix) + 1 or max_target_length < 1:
        raise GLMError(f"max_source_length must be >= {len(tokenizer.prefix) + 1} and max_target_length >= 1, "
                       f"got {max_source_length} and {max_target_length}")
    # Deliberate deviation: the reference first cuts the templated prompt to max_source_length - 1
    # *characters*, which drops the "答：" cue of prompts that fit in max_source_length tokens; here the
    # prompt is truncated by tokens exactly as in training, so the model sees the prompts it learned from.
    sources, full, dropped = _encode_sources(tokenizer, records, version, max_source_length - len(tokenizer.prefix))
    # Deliberate deviation: the reference encodes the answer WITH the [gMASK] sop prefix; GLM3's decode then
    # renders "[gMASK]sop" into the reference string and ROUGE/BLEU drop. Labels here are the answer only.
    targets = tokenizer.sp.encode([r.answer for r in records])
    n, prefix = len(records), tokenizer.prefix
    input_ids = np.full((n, max_source_length), tokenizer.pad_id, dtype=np.int32)
    labels = np.full((n, max_target_length), tokenizer.pad_id, dtype=np.int32)
    src_len = np.empty(n, dtype=np.int64)
    tgt_len = np.empty(n, dtype=np.int64)
    room = max_source_length - len(prefix)
    for i, (s, t) in enumerate(zip(sources, targets)):
        src_len[i], tgt_len[i] = full[i] + len(prefix), len(t)
        a = prefix + s[:room]
        b = t[:max_target_length]
        input_ids[i, :len(a)] = a
        labels[i, :len(b)] = b
    stats = _length_stats(src_len, tgt_len, max_source_length, max_target_length)
    if any(r.history for r in records):
        stats["dropped_rounds"] = dropped
    return {"input_ids": input_ids, "labels": labels, "index": np.arange(n, dtype=np.int32)}, stats


def format_stats(stats: dict) -> str:
    """A compact multi-line summary of `stats` for the console / output_dir."""
    skipped = stats.get("skipped", {})
    n_skip = sum(skipped.values())
    reasons = ", ".join(f"{k} {v}" for k, v in skipped.items() if v) or "none"
    s, t = stats["source_tokens"], stats["target_tokens"]
    kind = "conversations" if stats.get("format") == "conversations" else f"v{stats.get('version', '')}"
    head = f"data {stats.get('file', '')} ({stats.get('phase', '')} {kind})".rstrip()
    extra = []
    if "dropped_rounds" in stats:
        extra.append(f"  history rounds dropped to fit max_source_length: {stats['dropped_rounds']}")
    if "dropped_turns" in stats:
        extra.append(f"  earliest turns dropped to fit: {stats['dropped_turns']} turns in "
                     f"{stats['samples_with_dropped_turns']} samples")
    if "packing" in stats:
        from glm.packing import format_packing

        extra.append(format_packing(stats))
    return "\n".join([
        head,
        f"  lines read {stats['lines_read']}, skipped {n_skip} ({reasons}), samples {stats['samples']}",
        f"  truncated: source {stats['truncated_source']}, target {stats['truncated_target']} "
        f"(max_source_length {stats.get('max_source_length')}, max_target_length {stats.get('max_target_length')})",
        f"  source tokens p50/p90/p99/max {s['p50']}/{s['p90']}/{s['p99']}/{s['max']}; "
        f"target tokens {t['p50']}/{t['p90']}/{t['p99']}/{t['max']}",
        *extra,
    ])


def load_adgen(path: str | Path, tokenizer: GLMTokenizer, *, phase: str, version: int, max_source_length: int,
               max_target_length: int, origin_columns: Sequence[str] = ("content", "summary"),
               ignore_pad_token_for_loss: bool = True,
               history_column: str | None = None) -> tuple[list[Record], dict[str, np.ndarray], dict]:
    """Read and preprocess a whole file once: returns (records, numpy samples, stats)."""
    records, counts = read_jsonl(path, origin_columns, require_answer=phase == "eval", history_column=history_column)
    if phase == "train":
        samples, lstats = preprocess_train(tokenizer, records, max_source_length, max_target_length, version,
                                           ignore_pad_token_for_loss)
    else:
        samples, lstats = preprocess_eval(tokenizer, records, max_source_length, max_target_length, version)
    stats = {"file": str(path), "phase": phase, "version": version, **counts,
             "max_source_length": max_source_length, "max_target_length": max_target_length, **lstats}
    return records, samples, stats


def load_data(path: str | Path, tokenizer: GLMTokenizer, *, phase: str, version: int, max_source_length: int,
              max_target_length: int, fmt: str = "adgen", columns: dict | None = None,
              origin_columns: Sequence[str] = ("content", "summary"), ignore_pad_token_for_loss: bool = True,
              where: str = "data_loader") -> tuple[list[Record], dict[str, np.ndarray], dict]:
    """`load_adgen` or `load_conversations`, as data_loader.format says, with the columns resolved."""
    cols = resolve_columns(fmt, origin_columns, columns, where)
    if fmt == "conversations":
        from glm.conversations import load_conversations

        return load_conversations(path, tokenizer, phase=phase, max_source_length=max_source_length,
                                  max_target_length=max_target_length, columns=cols,
                                  ignore_pad_token_for_loss=ignore_pad_token_for_loss)
    return load_adgen(path, tokenizer, phase=phase, version=version, max_source_length=max_source_length,
                      max_target_length=max_target_length, origin_columns=(cols["prompt"], cols["response"]),
                      ignore_pad_token_for_loss=ignore_pad_token_for_loss, history_column=cols["history"])


def __getattr__(name: str):
    # `from glm.data import build_dataset` works without importing MindSpore for the numpy-only helpers.
    if name in ("build_dataset", "AdgenDataset"):
        from glm import dataset

        return getattr(dataset, name)
    raise AttributeError(f"module 'glm.data' has no attribute {name!r}")
