"""`--run_mode predict` (prompts from the command line or a file); `--run_mode chat` is in glm/chat.py.

Prompts are encoded in the format the checkpoint was fine-tuned with (recorded in its meta), else in the
model family's chat template (GLM2's "[Round n]" prompt, GLM3's role tokens); `prompt_format` /
`--prompt_format` (or `--raw_prompt`) overrides it (see glm/prompt_format.py). Results are printed and
written to `<output_dir>/predict_results.jsonl`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from glm import GLMError
from glm.build import (
    build_model,
    build_tokenizer,
    check_vocab,
    generation_config,
    init_process,
    load_checkpoints,
    tokenizer_section,
)
from glm.chat_format import chat_prompt_ids, parse_reply, reply_text
from glm.conversations import read_chat_prompts
from glm.generate import Generator
from glm.io import write_jsonl_atomic
from glm.prompt_format import encode_prompt, family_format, recorded_format, resolve_prompt_format
from glm.settings import RunConfig, as_run

PROMPT_KEYS = ("prompt", "query", "content", "text", "input")


def read_prompts(items: list[str]) -> list[str]:
    """One text, several texts, or one file (.jsonl/.json: one JSON object or string a line; else a line each)."""
    if not items:
        raise GLMError("--predict_data: give a prompt, several prompts, or a file of prompts")
    if len(items) == 1 and _is_file(items[0]):
        path = Path(items[0])
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError as e:
            raise GLMError(f"--predict_data {path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
        prompts = []
        for no, line in enumerate(lines, 1):
            if not line.strip():
                continue
            if path.suffix in (".jsonl", ".json"):
                prompts.append(_json_prompt(line, path, no))
            else:
                prompts.append(line)
        if not prompts:
            raise GLMError(f"--predict_data {path}: the file has no prompt")
        return prompts
    for item in items:
        if _looks_like_file(item):
            raise GLMError(f"--predict_data {item}: no such file (one word ending in .txt/.json/.jsonl is read as "
                           "a prompt file, not as a prompt)")
    prompts = [p.replace("\\n", "\n") for p in items]   # the reference's convention for a literal "\n"
    for i, p in enumerate(prompts):
        if not p.strip():
            raise GLMError(f"--predict_data: prompt {i + 1} is empty")
    return prompts


def _is_file(item: str) -> bool:
    try:
        return Path(item).is_file()
    except (OSError, ValueError):   # a long prompt is no file name (ENAMETOOLONG), nor one with a NUL
        return False


def _looks_like_file(item: str) -> bool:
    """A single word ending in .txt/.json/.jsonl that is not a file: a mistyped path, not a prompt."""
    s = item.strip()
    return (s.endswith((".txt", ".json", ".jsonl")) and not any(c.isspace() for c in s) and len(s) < 4096
            and not _is_file(s))


def _json_prompt(line: str, path: Path, no: int) -> str:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise GLMError(f"--predict_data {path}:{no}: invalid JSON ({e.msg})") from None
    if isinstance(obj, str):
        return obj
    for key in PROMPT_KEYS:
        if isinstance(obj, dict) and isinstance(obj.get(key), str) and obj[key].strip():
            return obj[key]
    raise GLMError(f"--predict_data {path}:{no}: expected a string or an object with one of {list(PROMPT_KEYS)}")


def _session(cfg: RunConfig | dict, rows: int, run_mode: str, requested_format: str | None = None):
    """(tokenizer, generator, generation config, prompt format) for predict and chat."""
    cfg = as_run(cfg)
    init_process(cfg)
    tok = build_tokenizer(cfg)
    model, lora = build_model(cfg, use_past=True, batch_size=rows)
    check_vocab(tok, model.config, tokenizer_section(cfg)[1])
    metas: list[dict] = []
    load_checkpoints(model, cfg.load_checkpoint, lora, required=True, run_mode=run_mode, metas=metas)
    fmt = resolve_prompt_format(requested_format or cfg.prompt_format, recorded_format(metas), family_format(tok))
    encode_prompt(tok, fmt, "")   # a format this tokenizer cannot encode fails here, before any prompt
    return tok, Generator(model, use_cache=True), generation_config(cfg, tok), fmt


def run_predict(cfg: RunConfig | dict, items: list[str]) -> list[dict]:
    # A ChatGLM3 conversations file: each line answered from its turns before the last assistant turn.
    chats = read_chat_prompts(items[0]) if len(items) == 1 and _is_file(items[0]) else None
    prompts = read_prompts(items) if chats is None else [_last_asked(c.messages) for c in chats]
    run = as_run(cfg)   # prompts per batch: predict_batch_size, else runner_config.batch_size
    rows = max(1, min(len(prompts), run.predict_batch_size or run.runner_config.batch_size))
    tok, generator, gen, fmt = _session(cfg, rows, "predict")   # --raw_prompt is prompt_format raw in cfg
    if chats is not None and fmt != "glm3_chat":   # role tokens, tools and observations have no other format
        raise GLMError(f"--predict_data {items[0]}: a conversations file needs the glm3_chat prompt format "
                       f"(this run uses {fmt}); give plain prompts, or --prompt_format glm3_chat")
    if chats is not None:
        encoded = [chat_prompt_ids(tok, c.messages) for c in chats]
    else:
        print(f"prompt format: {fmt}", flush=True)
        encoded = [encode_prompt(tok, fmt, p) for p in prompts]
    outputs = generator.generate(encoded, gen)
    results = [{"prompt": p, "response": tok.decode(o), "new_tokens": len(o)} for p, o in zip(prompts, outputs)]
    for r, c in zip(results, chats or []):
        r.update(line=c.line, response=reply_text(*parse_reply(r["response"])), reference=c.reference)
    for r in results:
        print(f">>> {r['prompt']}\n{r['response']}\n", flush=True)
    path = write_jsonl_atomic(results, Path(run.output_dir) / "predict_results.jsonl")
    print(f"results: {path}", file=sys.stderr)
    return results


def _last_asked(messages: list) -> str:
    return next((m.content for m in reversed(messages) if m.role != "system"), "")
