"""ChatGLM2 / ChatGLM3 tokenizers over a SentencePiece `tokenizer.model`.

The special tokens are not part of the SentencePiece model: they get the ids right after its vocabulary
(n = sp.vocab_size(), 64789 for the real model): [MASK] n, [gMASK] n+1, [sMASK] n+2, sop n+3, eop n+4, and for
ChatGLM3 also <|system|> n+5, <|user|> n+6, <|assistant|> n+7, <|observation|> n+8. eos = 2, pad = unk = 0.
Special-token strings inside raw text are encoded as plain text, like the reference.

This module must stay importable without MindSpore (tools and the CLI's config checks use it).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Union

import numpy as np
import sentencepiece as spm

from glm import GLMError
from glm.chat_format import chat_prompt_ids, normalize_messages

# A GLM2 history is a list of (query, response) pairs; a GLM3 one a list of {"role", "content", ...} dicts.
History = Sequence[Union[Sequence[str], dict]]

GLM2_SPECIALS = ("[MASK]", "[gMASK]", "[sMASK]", "sop", "eop")
GLM3_ROLES = ("system", "user", "assistant", "observation")


def load_sentencepiece(vocab_file: str | Path) -> spm.SentencePieceProcessor:
    """Load a SentencePiece model, turning every failure into a one-line GLMError naming the file."""
    path = Path(vocab_file)
    if not path.exists():
        raise GLMError(f"tokenizer vocab_file {str(path)!r} does not exist")
    if not path.is_file():
        raise GLMError(f"tokenizer vocab_file {str(path)!r} is a directory, expected a sentencepiece tokenizer.model file")
    sp = spm.SentencePieceProcessor()
    try:
        sp.Load(str(path))
    except (RuntimeError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise GLMError(f"tokenizer vocab_file {str(path)!r} is not a sentencepiece model ({first})") from None
    return sp


class GLMTokenizer:
    """SentencePiece pieces plus the GLM special tokens appended after them."""

    special_names: tuple[str, ...] = GLM2_SPECIALS

    def __init__(self, vocab_file: str | Path):
        self.vocab_file = str(vocab_file)
        self.sp = load_sentencepiece(vocab_file)
        n = self.sp.vocab_size()
        self.sp_vocab_size = n
        self.special_tokens = {name: n + i for i, name in enumerate(self.special_names)}
        self.id_to_special = {i: name for name, i in self.special_tokens.items()}
        self.vocab_size = n + len(self.special_names)
        self.bos_id = self.sp.bos_id()
        self.eos_id = self.sp.eos_id()
        self.pad_id = self.sp.unk_id()  # ChatGLM pads with <unk> (0); the model masks keys by id 0
        self.gmask_id = self.special_tokens["[gMASK]"]
        self.sop_id = self.special_tokens["sop"]
        self.prefix = [self.gmask_id, self.sop_id]
        # Ids that decode() always drops (the reference maps them to "").
        self._control = {i for i in (self.bos_id, self.eos_id, self.pad_id) if i >= 0}

    @property
    def stop_token_ids(self) -> list[int]:
        return [self.eos_id]

    def _truncate(self, body: list[int], add_special_tokens: bool, max_length: int | None,
                  truncation: bool) -> list[int]:
        extra = self.prefix if add_special_tokens else []
        if max_length is not None and truncation:
            room = max_length - len(extra)
            if room < 0:
                raise GLMError(f"max_length={max_length} is smaller than the {len(extra)} special tokens")
            body = body[:room]
        return extra + body

    def encode(self, text: str, add_special_tokens: bool = True, max_length: int | None = None,
               truncation: bool = True) -> list[int]:
        """Token ids of `text`; the [gMASK] sop prefix counts toward max_length; truncation keeps the left."""
        return self._truncate(self.sp.encode(text), add_special_tokens, max_length, truncation)

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = True, max_length: int | None = None,
                     truncation: bool = True) -> list[list[int]]:
        """`encode` over a list; one sentencepiece call for all texts (much faster than a Python loop)."""
        return [self._truncate(ids, add_special_tokens, max_length, truncation)
                for ids in self.sp.encode(list(texts))]

    def _check_ids(self, ids: Sequence[int]) -> list[int]:
        ids = [int(i) for i in ids]
        for i in ids:
            if not 0 <= i < self.vocab_size:
                raise GLMError(f"token id {i} is outside the vocabulary [0, {self.vocab_size}) of {self.vocab_file!r}")
        return ids

    def decode(self, ids: Sequence[int] | np.ndarray, skip_special_tokens: bool = True) -> str:
        """Text of `ids`. bos/eos/pad are always dropped (pad is sp's <unk>, so unknown pieces vanish too);
        special tokens are dropped, or rendered by name when skip_special_tokens=False."""
        ids = self._check_ids(np.asarray(ids).reshape(-1).tolist())
        n = self.sp_vocab_size
        if skip_special_tokens:
            return self.sp.decode([i for i in ids if i < n and i not in self._control])
        out, run = [], []
        for i in ids:
            if i in self._control:
                continue
            if i >= n:
                out.append(self.sp.decode(run))
                out.append(self.id_to_special[i])
                run = []
            else:
                run.append(i)
        out.append(self.sp.decode(run))
        return "".join(out)

    def convert_tokens_to_ids(self, token: str) -> int:
        if token in self.special_tokens:
            return self.special_tokens[token]
        return self.sp.piece_to_id(token)

    def build_generation_input(self, query: str, history: History | None = None) -> list[int]:
        raise NotImplementedError

    def pad(self, batch: Sequence[Sequence[int]], side: str = "right",
            length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Pad id lists into an int32 [B, L] array with pad id 0; returns (ids, lengths).

        side="left" for generation batches (new tokens append at the same column for every row),
        "right" for training. `length` defaults to the longest row; a longer row is an error, not cut.
        """
        if side not in ("left", "right"):
            raise GLMError(f"pad side must be 'left' or 'right', got {side!r}")
        lengths = np.array([len(x) for x in batch], dtype=np.int32)
        width = int(lengths.max(initial=0)) if length is None else int(length)
        if len(batch) and lengths.max() > width:
            raise GLMError(f"cannot pad a sequence of {int(lengths.max())} tokens to length {width}")
        out = np.full((len(batch), width), self.pad_id, dtype=np.int32)
        for row, ids in enumerate(batch):
            if len(ids):
                if side == "right":
                    out[row, :len(ids)] = ids
                else:
                    out[row, width - len(ids):] = ids
        return out, lengths


class ChatGLM2Tokenizer(GLMTokenizer):
    special_names = GLM2_SPECIALS

    @staticmethod
    def build_prompt(query: str, history: History | None = None) -> str:
        """The "[Round i]\\n\\n问：…\\n\\n答：…" chat template of ChatGLM2 (rounds are 1-based)."""
        pairs = _as_pairs(history or [])
        prompt = "".join(f"[Round {i + 1}]\n\n问：{q}\n\n答：{r}\n\n" for i, (q, r) in enumerate(pairs))
        return prompt + f"[Round {len(pairs) + 1}]\n\n问：{query}\n\n答："

    def build_generation_input(self, query: str, history: History | None = None) -> list[int]:
        return self.encode(self.build_prompt(query, history), add_special_tokens=True)


class ChatGLM3Tokenizer(GLMTokenizer):
    special_names = GLM2_SPECIALS + tuple(f"<|{r}|>" for r in GLM3_ROLES)

    @property
    def stop_token_ids(self) -> list[int]:
        # Chat turns end with <|user|> (or <|observation|> after a tool call) at least as often as with eos.
        return [self.eos_id, self.special_tokens["<|user|>"], self.special_tokens["<|observation|>"]]

    def role_id(self, role: str) -> int:
        if role not in GLM3_ROLES:
            raise GLMError(f"unknown chat role {role!r}: expected one of {list(GLM3_ROLES)}")
        return self.special_tokens[f"<|{role}|>"]

    def build_chat_input(self, query: str, history: History | None = None, role: str = "user") -> list[int]:
        """[gMASK] sop, every history message, the new message, then <|assistant|> to prompt the reply.

        Built by glm.chat_format (the one GLM3 message builder); a system item's "tools" join its content as
        ChatGLM3 does (the reference forgets `import json` there and raises NameError).
        """
        self.role_id(role)
        return chat_prompt_ids(self, normalize_messages(_as_messages(history or []) + [{"role": role, "content": query}]))

    def build_generation_input(self, query: str, history: History | None = None) -> list[int]:
        return self.build_chat_input(query, history)


def _as_pairs(history: History) -> list[tuple[str, str]]:
    """GLM2 history: accept (query, response) pairs or alternating user/assistant message dicts."""
    if history and isinstance(history[0], dict):
        users = [m.get("content", "") for m in history if m.get("role") == "user"]
        bots = [m.get("content", "") for m in history if m.get("role") == "assistant"]
        return list(zip(users, bots))
    out = []
    for item in history:
        if len(item) != 2:
            raise GLMError(f"history item {item!r}: expected a (query, response) pair")
        out.append((item[0], item[1]))
    return out


def _as_messages(history: History) -> list[dict[str, Any]]:
    """GLM3 history: accept message dicts or (query, response) pairs (turned into user + assistant)."""
    out: list[dict[str, Any]] = []
    for item in history:
        if isinstance(item, dict):
            if "role" not in item:
                raise GLMError(f"history item {item!r}: missing 'role'")
            out.append({"content": "", **item})
        elif len(item) == 2:
            out += [{"role": "user", "content": item[0]}, {"role": "assistant", "content": item[1]}]
        else:
            raise GLMError(f"history item {item!r}: expected a message dict or a (query, response) pair")
    return out


TOKENIZERS = {"ChatGLM2Tokenizer": ChatGLM2Tokenizer, "ChatGLM3Tokenizer": ChatGLM3Tokenizer}


def load_tokenizer(type_name: str, vocab_file: str | Path) -> GLMTokenizer:
    """Build the tokenizer named in a config (`tokenizer.type`) from its `vocab_file`."""
    if type_name not in TOKENIZERS:
        raise GLMError(f"unknown tokenizer type {type_name!r}: expected one of {sorted(TOKENIZERS)}")
    return TOKENIZERS[type_name](vocab_file)
