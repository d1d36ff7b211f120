"""Prompt formats: how a text becomes the token ids a model sees, from training to serving.

A model answers best in the format it was fine-tuned on, so the trainer records that format in every
checkpoint and adapter it writes (meta `prompt_format`), and eval, predict and chat use it by default.
An explicit request (`prompt_format` in the config, `--prompt_format`, `--raw_prompt`) wins; when it
differs from the checkpoint's format a warning names both. Weights without a record (converted HF or
MindFormers checkpoints, random init) get the data's format (eval) or the model family's chat template
(predict, chat), as before.

    raw        [gMASK] sop <text>                              data_loader version 3 (MindFormers v1.0.2)
    glm2       [gMASK] sop [Round 1]\\n\\n问：<text>\\n\\n答：      data_loader version 2; ChatGLM2's chat template
    glm3_chat  [gMASK] sop <|user|>\\n <text> <|assistant|>     ChatGLM3's chat template (official chat models;
                                                                data_loader.format: conversations)

`resolve_prompt_format` is the one place that decides; `encode_prompt` the one that encodes.
"""

from __future__ import annotations

import sys
from typing import Optional

from glm import GLMError
from glm.tokenizer import ChatGLM2Tokenizer, ChatGLM3Tokenizer, GLMTokenizer, History

AUTO = "auto"
PROMPT_FORMATS = {
    "raw": "[gMASK] sop <text>: the text as is (data_loader version 3, MindFormers' GLM3 fine-tuning format)",
    "glm2": "[gMASK] sop [Round 1] 问：<text> 答：  (data_loader version 2; ChatGLM2's chat template)",
    "glm3_chat": "[gMASK] sop <|user|> <text> <|assistant|>  (ChatGLM3's chat template)",
}
# ADGEN data_loader.version -> the format its samples are in, and back.
VERSION_FORMATS = {2: "glm2", 3: "raw"}
FORMAT_VERSIONS = {fmt: version for version, fmt in VERSION_FORMATS.items()}


def check_format(name: str, where: str = "prompt_format") -> str:
    if name != AUTO and name not in PROMPT_FORMATS:
        raise GLMError(f"{where}: expected {AUTO} or one of {sorted(PROMPT_FORMATS)}, got {name!r}")
    return name


def data_format(dataset_section: dict) -> str:
    """The format a dataset block's samples are in (`data_loader.format: conversations` is ChatGLM3's chat
    template; ADGEN pairs follow `data_loader.version`)."""
    loader = dataset_section.get("data_loader") or {}
    if loader.get("format") == "conversations":
        return "glm3_chat"
    version = loader["version"]   # the typed section (glm/sections.py) holds the one default
    fmt = VERSION_FORMATS.get(version)
    if fmt is None:
        raise GLMError(f"data_loader.version: expected one of {sorted(VERSION_FORMATS)}, got {version!r}")
    return fmt


def family_format(tokenizer: GLMTokenizer) -> str:
    """The chat template of the model family (what the official chat checkpoints expect)."""
    return "glm3_chat" if isinstance(tokenizer, ChatGLM3Tokenizer) else "glm2"


def recorded_format(metas: list[dict]) -> Optional[str]:
    """The format the loaded weights were fine-tuned with: the last file that records one wins
    (an adapter listed after its base)."""
    found = [m.get("prompt_format") for m in metas if m.get("prompt_format") in PROMPT_FORMATS]
    return found[-1] if found else None


def resolve_prompt_format(requested: Optional[str], recorded: Optional[str], fallback: str,
                          fallback_source: str = "default", warn=None) -> str:
    """The format to use: an explicit request, else the checkpoint's record, else `fallback`.

    A request that differs from the record is honoured with a warning naming both (the model was not
    trained on what it is about to see); so is a fallback (e.g. the eval data's version) that the
    record overrides.
    """
    warn = warn or (lambda msg: print(f"warning: {msg}", file=sys.stderr, flush=True))
    requested = None if requested in (None, "", AUTO) else check_format(requested)
    if requested is not None:
        if recorded is not None and recorded != requested:
            warn(f"prompt format {requested} was requested but the checkpoint was fine-tuned with {recorded}; "
                 f"answers may be poor (drop the request to use {recorded})")
        return requested
    if recorded is not None:
        if recorded != fallback and fallback_source != "default":
            warn(f"using prompt format {recorded} recorded in the checkpoint, not {fallback} of {fallback_source} "
                 f"(set prompt_format: {fallback} to use that)")
        return recorded
    return fallback


def encode_prompt(tokenizer: GLMTokenizer, fmt: str, query: str, history: Optional[History] = None) -> list[int]:
    """Token ids of `query` (after `history`, for the chat templates) in format `fmt`.

    `raw` has no turns: a history is prepended as plain text (each query followed by its answer)."""
    if fmt == "raw":
        past = "".join(_turn_text(item) for item in history or [])
        return tokenizer.encode(past + query)
    if fmt == "glm2":
        return tokenizer.encode(ChatGLM2Tokenizer.build_prompt(query, history))
    if fmt == "glm3_chat":
        if not isinstance(tokenizer, ChatGLM3Tokenizer):
            raise GLMError("prompt format glm3_chat needs the ChatGLM3 tokenizer (its role tokens); this config's "
                           "tokenizer is ChatGLM2Tokenizer: use raw or glm2")
        return tokenizer.build_chat_input(query, history)
    raise GLMError(f"prompt format: expected one of {sorted(PROMPT_FORMATS)}, got {fmt!r}")


def _turn_text(item) -> str:
    if isinstance(item, dict):
        return str(item.get("content", ""))
    return "".join(str(part) for part in item)
