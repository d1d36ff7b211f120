"""ChatGLM3 conversations (format: conversations), ChatGLM2 history and column mapping.

Expected ids are built here from raw sentencepiece calls and ChatGLM3's rules written out (build_single_message,
the tools JSON of build_chat_input, process_batch's shifted loss mask), never from glm.chat_format.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import unicodedata
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
from cli_utils import run_glm

from glm import GLMError
from glm.chat_format import chat_prompt_ids, normalize_messages, parse_reply, reply_text
from glm.data import load_data
from glm.tokenizer import ChatGLM2Tokenizer, ChatGLM3Tokenizer

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(__file__).resolve().parents[2] / "shared"
REAL_MODEL = SHARED / "data" / "tokenizers" / "chatglm3" / "tokenizer.model"
SAMPLE = REPO / "data" / "sample"
GMASK, SOP, EOS = 64790, 64792, 2
SYSTEM, USER, ASSISTANT, OBSERVATION = 64794, 64795, 64796, 64797

needs_real = pytest.mark.skipif(not REAL_MODEL.is_file(), reason=f"real ChatGLM3 tokenizer not found at {REAL_MODEL}")

TOOLS = [{"name": "get_weather", "description": "查询城市天气",
          "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}]
CONVERSATION = [
    {"role": "system", "content": "你是一个乐于助人的助手。"},
    {"role": "user", "content": "北京今天天气怎么样？"},
    {"role": "assistant", "metadata": "get_weather", "content": "{\"city\": \"北京\"}"},
    {"role": "observation", "content": "{\"天气\": \"晴\", \"气温\": \"25℃\"}"},
    {"role": "assistant", "content": "北京今天晴，气温25℃，适合出门。"},
]


def write_lines(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows),
                    encoding="utf-8")
    return path


def load(path, tok, phase="train", src=192, tgt=63, version=3, **kw):
    return load_data(path, tok, phase=phase, version=version, max_source_length=src, max_target_length=tgt,
                     fmt=kw.pop("fmt", "conversations"), **kw)


def chatglm3_reference(sp: spm.SentencePieceProcessor, conversation: list[dict], tools: list | None):
    """ids and (unshifted, HF-style) labels as ChatGLM3 builds them: build_single_message per turn, the tools
    JSON in the system turn, and finetune_demo process_batch's mask shifted by one (loss_masks = [False, *m])."""
    role_ids = {"system": SYSTEM, "user": USER, "assistant": ASSISTANT, "observation": OBSERVATION}
    ids, mask = [GMASK, SOP], [False, False]
    for m in conversation:
        content = m["content"]
        if m["role"] == "system" and tools:
            content = content + "\n" + json.dumps(tools, indent=4, ensure_ascii=False)
        part = [role_ids[m["role"]]] + sp.encode(f"{m.get('metadata', '')}\n") + sp.encode(content)
        ids += part
        mask += [m["role"] == "assistant" and m.get("loss", True)] * len(part)
    ids.append(EOS)
    mask = [False, *mask]
    return ids, [i if k else -100 for i, k in zip(ids, mask)]


def unpadded(samples: dict, row: int) -> tuple[list[int], list[int]]:
    ids = samples["input_ids"][row]
    n = int((ids != 0).sum())
    return ids[:n].tolist(), samples["labels"][row][:n].tolist()


# ---------------------------------------------------------------- ids and labels against ChatGLM3's rules

@needs_real
def test_tool_conversation_ids_and_labels_match_chatglm3(tmp_path):
    sp = spm.SentencePieceProcessor(model_file=str(REAL_MODEL))
    tok = ChatGLM3Tokenizer(REAL_MODEL)
    path = write_lines(tmp_path / "chat.json", [{"conversations": CONVERSATION, "tools": TOOLS}])
    records, samples, stats = load(path, tok, src=300, tgt=100)
    ids, labels = unpadded(samples, 0)
    ref_ids, ref_labels = chatglm3_reference(sp, CONVERSATION, TOOLS)
    assert ids == ref_ids
    # The project's labels are pre-shifted (labels[t] is the target for input t+1): labels[t] == HF labels[t+1].
    assert labels[:-1] == ref_labels[1:] and labels[-1] == -100
    assert samples["labels"][0][len(ids):].tolist() == [-100] * (401 - len(ids))
    # Spelled out: the targets are both assistant turns after their role token (metadata line, tool-call JSON,
    # answer) plus the token after each: <|observation|> after the call, eos after the answer.
    targets = [t for t in labels if t != -100]
    call = sp.encode("get_weather\n") + sp.encode("{\"city\": \"北京\"}")
    answer = sp.encode("\n") + sp.encode("北京今天晴，气温25℃，适合出门。")
    assert targets == call + [OBSERVATION] + answer + [EOS]
    assert ids[:3] == [GMASK, SOP, SYSTEM] and ids[-1] == EOS
    assert records[0].answer == "北京今天晴，气温25℃，适合出门。" and stats["dropped_turns"] == 0


@needs_real
def test_prompt_builder_is_the_tokenizers_chat_input(tmp_path):
    """One builder: the eval prompt, chat_prompt_ids and ChatGLM3Tokenizer.build_chat_input agree, and equal the
    training ids up to the last assistant role token."""
    tok = ChatGLM3Tokenizer(REAL_MODEL)
    sp = spm.SentencePieceProcessor(model_file=str(REAL_MODEL))
    path = write_lines(tmp_path / "chat.json", [{"conversations": CONVERSATION, "tools": TOOLS}])
    _, samples, _ = load(path, tok, phase="eval", src=300, tgt=40)
    prompt = samples["input_ids"][0][samples["input_ids"][0] != 0].tolist()
    ref_ids, _ = chatglm3_reference(sp, CONVERSATION, TOOLS)
    cut = len(ref_ids) - 1 - len(sp.encode("\n") + sp.encode(CONVERSATION[-1]["content"]))
    assert prompt == ref_ids[:cut] and prompt[-1] == ASSISTANT
    history = [{**CONVERSATION[0], "tools": TOOLS}, *CONVERSATION[1:3]]
    assert tok.build_chat_input(CONVERSATION[3]["content"], history, role="observation") == prompt
    assert chat_prompt_ids(tok, normalize_messages(CONVERSATION[:4], TOOLS)) == prompt
    assert tok.decode(samples["labels"][0]) == CONVERSATION[-1]["content"]


def test_loss_false_turn_is_context_only(tmp_path):
    tok = ChatGLM3Tokenizer(SAMPLE / "tokenizer.model")
    sp = tok.sp
    conv = [{"role": "user", "content": "类型#裙"}, {"role": "assistant", "content": "这款裙子", "loss": False},
            {"role": "user", "content": "颜色#红色"}, {"role": "assistant", "content": "热情的红色"}]
    path = write_lines(tmp_path / "chat.json", [{"conversations": conv}])
    _, samples, _ = load(path, tok)
    ids, labels = unpadded(samples, 0)
    u, a = tok.special_tokens["<|user|>"], tok.special_tokens["<|assistant|>"]
    nl = sp.encode("\n")
    expected = [tok.gmask_id, tok.sop_id, u, *nl, *sp.encode("类型#裙"), a, *nl, *sp.encode("这款裙子"),
                u, *nl, *sp.encode("颜色#红色"), a, *nl, *sp.encode("热情的红色"), tok.eos_id]
    assert ids == expected
    # Only the last reply (after its role token) and eos are targets; the <|user|> after the loss:false turn too
    # is not, since it would teach that turn's ending.
    assert [t for t in labels if t != -100] == [*nl, *sp.encode("热情的红色"), tok.eos_id]
    start = len(ids) - len(nl) - len(sp.encode("热情的红色")) - 2   # the last <|assistant|>
    assert labels[start] == nl[0] and labels[start - 1] == -100


# ---------------------------------------------------------------- truncation

def _rounds(n: int) -> list[dict]:
    conv = [{"role": "system", "content": "Shop assistant."}]
    for i in range(n):
        conv += [{"role": "user", "content": f"类型#裙*颜色#红色 {i}"},
                 {"role": "assistant", "content": "这款裙子，热情的红色显得气色很好，是衣橱里的必备单品。"}]
    return conv


def test_truncation_drops_earliest_rounds_and_keeps_the_last_reply(tmp_path, capsys):
    tok = ChatGLM3Tokenizer(SAMPLE / "tokenizer.model")
    enc = {n: len(chat_prompt_ids(tok, normalize_messages(_rounds(n)[:-1]))) for n in (1, 2, 5)}
    full = {n: len(load(write_lines(tmp_path / f"c{n}.json", [{"conversations": _rounds(n)}]), tok, src=400,
                        tgt=100)[1]["input_ids"][0].nonzero()[0]) for n in (1, 2)}
    per_round = full[2] - full[1]
    src, tgt = full[2] - 40, 39    # room for 2 rounds, not 3
    path = write_lines(tmp_path / "long.json", [{"conversations": _rounds(5)}, {"conversations": _rounds(1)}])
    records, samples, stats = load(path, tok, src=src, tgt=tgt)
    ids, labels = unpadded(samples, 0)
    kept = _rounds(5)
    expected_ids, _ = chatglm3_like(tok, [kept[0], *kept[-4:]])
    assert ids == expected_ids and len(ids) <= src + tgt + 1
    assert ids[2] == tok.special_tokens["<|system|>"]                   # the system turn stays
    assert ids[-1] == tok.eos_id and labels[-2] == tok.eos_id           # the last reply is whole, eos learned
    assert stats["dropped_turns"] == 6 and stats["samples_with_dropped_turns"] == 1
    assert stats["truncated_source"] == 1 and stats["truncated_target"] == 0 and stats["samples"] == 2
    assert enc[5] > src + tgt + 1 and per_round > 0
    # Too long even alone: the last reply must start inside the window, else the line is skipped in train ...
    tiny = write_lines(tmp_path / "tiny.json", [{"conversations": _rounds(1)}, {"conversations": _rounds(3)}])
    with pytest.raises(GLMError, match="no conversation fits in 12 tokens"):
        load(tiny, tok, src=6, tgt=5)
    capsys.readouterr()
    records, samples, stats = load(tiny, tok, src=enc[1] - 4, tgt=8)
    assert [r.line for r in records] == [1, 2] and stats["skipped"]["too_long"] == 0
    assert stats["truncated_target"] == 2          # the reply was cut at the end, then eos
    ids, labels = unpadded(samples, 0)
    assert ids[-1] == tok.eos_id and labels[-2] == tok.eos_id and len(ids) == enc[1] - 4 + 8 + 1
    # ... and an error in eval, naming the line.
    with pytest.raises(GLMError, match=r"tiny.json' line 1: the prompt of the last assistant turn needs \d+ tokens"):
        load(tiny, tok, phase="eval", src=enc[1] - 1, tgt=8)


def chatglm3_like(tok, conversation):
    sp = tok.sp
    role = {r: tok.special_tokens[f"<|{r}|>"] for r in ("system", "user", "assistant", "observation")}
    ids = [tok.gmask_id, tok.sop_id]
    for m in conversation:
        ids += [role[m["role"]]] + sp.encode(f"{m.get('metadata', '')}\n") + sp.encode(m["content"])
    return ids + [tok.eos_id], None


def test_too_long_lines_are_skipped_with_a_warning(tmp_path, capsys):
    tok = ChatGLM3Tokenizer(SAMPLE / "tokenizer.model")
    long_user = [{"role": "user", "content": "类型#裙*" * 40}, {"role": "assistant", "content": "这款裙子"}]
    path = write_lines(tmp_path / "t.json", [{"conversations": _rounds(1)}, {"conversations": long_user}])
    records, _, stats = load(path, tok, src=40, tgt=20)
    assert [r.line for r in records] == [1] and stats["skipped"]["too_long"] == 1
    err = capsys.readouterr().err
    assert "skipped 1 conversations whose last assistant reply does not start within" in err and "lines 2" in err


# ---------------------------------------------------------------- bad rows

BAD_ROWS = [
    ({"conversations": [{"role": "bot", "content": "x"}, {"role": "assistant", "content": "y"}]},
     "message 1: unknown chat role 'bot'"),
    ({"conversations": [{"role": "user", "content": "类型#裙"}]}, "no assistant turn"),
    ({"conversations": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}], "tools": "x"},
     "tools: expected a list, got str"),
    ({"conversations": []}, "empty conversation"),
    ({"messages": []}, "no 'conversations' key"),
    ({"conversations": [{"role": "user"}, {"role": "assistant", "content": "y"}]}, "message 1 (user): missing 'content'"),
]


def test_bad_rows_warn_in_train_and_fail_in_eval(tmp_path, capsys):
    tok = ChatGLM3Tokenizer(SAMPLE / "tokenizer.model")
    good = {"conversations": _rounds(1)}
    path = write_lines(tmp_path / "bad.json", [good] + [row for row, _ in BAD_ROWS] + ["{oops", "", good])
    records, samples, stats = load(path, tok)
    assert [r.line for r in records] == [1, 10] and len(samples["input_ids"]) == 2
    assert stats["skipped"]["bad_conversation"] == len(BAD_ROWS)
    assert stats["skipped"]["invalid_json"] == 1 and stats["skipped"]["blank_line"] == 1
    err = capsys.readouterr().err.splitlines()
    for line_no, (_, why) in enumerate(BAD_ROWS[:5], 2):
        assert any(e.startswith(f"warning: {path} line {line_no}: {why}") and e.endswith("; line skipped")
                   for e in err), why
    assert any("1 more lines skipped" in e for e in err)
    for row, why in BAD_ROWS:
        write_lines(path, [good, good] + [row])
        with pytest.raises(GLMError) as e:
            load(path, tok, phase="eval")
        assert str(e.value).startswith(f"dataset file {str(path)!r} line 3: {why}") and "\n" not in str(e.value)
    write_lines(path, [row for row, _ in BAD_ROWS])
    with pytest.raises(GLMError, match="no usable conversation"):
        load(path, tok)


# ---------------------------------------------------------------- columns, history, config

def test_column_mapping_for_conversations(tmp_path):
    tok = ChatGLM3Tokenizer(SAMPLE / "tokenizer.model")
    conv = [{"role": "user", "content": "类型#裙"}, {"role": "assistant", "content": "这款裙子"}]
    path = write_lines(tmp_path / "c.json", [{"messages": conv, "functions": [{"name": "f"}], "sys": "Shop."}])
    cols = {"conversations": "messages", "tools": "functions", "system": "sys"}
    _, samples, _ = load(path, tok, columns=cols)
    ids, _ = unpadded(samples, 0)
    expected, _ = chatglm3_like(tok, [{"role": "system", "content": "Shop.\n" + json.dumps([{"name": "f"}], indent=4)},
                                      *conv])
    assert ids == expected
    twice = write_lines(tmp_path / "twice.json", [{"messages": [{"role": "system", "content": "A."}, *conv], "sys": "B."}])
    with pytest.raises(GLMError, match="line 1: two system prompts"):
        load(twice, tok, phase="eval", columns=cols)
    # Tools and no system turn: ChatGLM3's tool prompt carries them.
    path = write_lines(tmp_path / "t.json", [{"conversations": conv, "tools": [{"name": "f"}]}])
    ids, _ = unpadded(load(path, tok)[1], 0)
    sys_text = ("Answer the following questions as best as you can. You have access to the following tools:\n"
                + json.dumps([{"name": "f"}], indent=4))
    assert ids == chatglm3_like(tok, [{"role": "system", "content": sys_text}, *conv])[0]
    with pytest.raises(GLMError, match=r"data_loader.columns.prompt: not used by format 'conversations'"):
        load(path, tok, columns={"prompt": "q"})
    with pytest.raises(GLMError, match="columns.system: not used by format 'adgen'; ChatGLM2's"):
        load(path, tok, fmt="adgen", columns={"system": "s"})
    with pytest.raises(GLMError, match="needs the ChatGLM3Tokenizer"):
        load(path, ChatGLM2Tokenizer(SAMPLE / "tokenizer.model"))
    # An ADGEN loader pointed at a conversations file says what to set.
    with pytest.raises(GLMError, match="set data_loader.format: conversations"):
        load(path, tok, fmt="adgen")


def test_history_builds_chatglm2_round_prompt(tmp_path, capsys):
    tok = ChatGLM2Tokenizer(SAMPLE / "tokenizer.model")
    sp = tok.sp
    rows = [{"q": "颜色#红色", "a": "热情的红色", "h": [["类型#裙", "这款裙子"], ["材质#棉", "柔软的棉质面料"]]},
            {"q": "类型#裤", "a": "这款裤子", "h": []},
            {"q": "类型#裤", "a": "这款裤子", "h": "not a list"}]
    path = write_lines(tmp_path / "h.json", rows)
    cols = {"prompt": "q", "response": "a", "history": "h"}
    records, samples, stats = load(path, tok, fmt="adgen", version=2, columns=cols, src=64, tgt=16)
    assert [r.line for r in records] == [1, 2] and stats["skipped"]["bad_history"] == 1
    assert "h.json line 3: 'h' must be a list of [query, response] pairs, got str; line skipped" in capsys.readouterr().err
    prompt = ("[Round 1]\n\n问：类型#裙\n\n答：这款裙子\n\n[Round 2]\n\n问：材质#棉\n\n答：柔软的棉质面料\n\n"
              "[Round 3]\n\n问：颜色#红色\n\n答：")
    a, b = [tok.gmask_id, tok.sop_id] + sp.encode(prompt), sp.encode("热情的红色") + [tok.eos_id]
    ids, labels = unpadded(samples, 0)
    assert ids == a + b
    assert [t for t in labels if t != -100] == b and labels[len(a) - 1] == b[0]      # loss on the final response
    # Too long: the earliest rounds go (the current question stays), counted in the stats.
    short = len(sp.encode("[Round 1]\n\n问：材质#棉\n\n答：柔软的棉质面料\n\n[Round 2]\n\n问：颜色#红色\n\n答：")) + 2
    _, samples, stats = load(path, tok, fmt="adgen", version=2, columns=cols, src=short, tgt=16)
    assert stats["dropped_rounds"] == 1 and stats["truncated_source"] == 1
    assert tok.decode(samples["input_ids"][0]).startswith("[Round 1]\n\n问：材质#棉")
    with pytest.raises(GLMError, match="line 3: 'h' must be a list"):
        load(path, tok, fmt="adgen", phase="eval", version=2, columns=cols)
    with pytest.raises(GLMError, match="version 3 .* cannot show a dialogue history"):
        load(path, ChatGLM3Tokenizer(SAMPLE / "tokenizer.model"), fmt="adgen", version=3, columns=cols)


def test_adgen_rows_that_do_not_fit_the_columns(tmp_path, capsys):
    tok = ChatGLM2Tokenizer(SAMPLE / "tokenizer.model")
    path = write_lines(tmp_path / "qa.json", [{"q": "类型#裙", "a": "这款裙子"}, {"q": "类型#裤", "answer": "这款裤子"}])
    cols = {"prompt": "q", "response": "a"}
    records, _, stats = load(path, tok, fmt="adgen", version=2, columns=cols)
    assert [r.line for r in records] == [1] and stats["skipped"]["missing_key"] == 1
    assert "skipped 1 of 2 lines (missing_key 1); first at lines 2" in capsys.readouterr().err
    with pytest.raises(GLMError) as e:
        load(path, tok, fmt="adgen", phase="eval", version=2, columns=cols)
    assert str(e.value) == (f"dataset file {str(path)!r} line 2: no 'a' key (the line has 'q', 'answer'); set "
                            "data_loader.columns (prompt/response) or origin_columns to the file's keys")


def test_config_accepts_format_and_columns():
    from glm.config import load_config

    cfg = load_config(REPO / "configs" / "glm3" / "run_glm3_tiny_chat.yaml")
    loader = cfg["train_dataset"]["data_loader"]
    assert loader["format"] == "conversations" and loader["columns"]["conversations"] == "conversations"
    assert cfg["eval_dataset"]["data_loader"]["columns"] == {k: None for k in loader["columns"]}
    with pytest.raises(GLMError, match="unknown key 'train_dataset.data_loader.columns.prompts'"):
        load_config(REPO / "configs" / "glm3" / "run_glm3_tiny_chat.yaml",
                    ["train_dataset.data_loader.columns.prompts=q"])
    with pytest.raises(GLMError, match="train_dataset.data_loader.format: conversations needs "
                                       "train_dataset.tokenizer.type: ChatGLM3Tokenizer"):
        load_config(REPO / "configs" / "glm3" / "run_glm3_tiny_chat.yaml",
                    ["train_dataset.tokenizer.type=ChatGLM2Tokenizer"])
    with pytest.raises(GLMError, match="eval_dataset.data_loader.columns.history: not used by format 'conversations'"):
        load_config(REPO / "configs" / "glm3" / "run_glm3_tiny_chat.yaml", ["eval_dataset.data_loader.columns.history=h"])
    with pytest.raises(GLMError, match="data_loader.format: expected one of 'adgen', 'conversations'"):
        load_config(REPO / "configs" / "glm3" / "run_glm3_tiny_chat.yaml", ["train_dataset.data_loader.format=chat"])


def test_parse_reply():
    assert parse_reply("find_item\n {\"类型\": \"裙\"}") == ("find_item", "{\"类型\": \"裙\"}")
    assert parse_reply("\n 这款裙子") == ("", "这款裙子")
    assert parse_reply("no metadata line") == ("", "no metadata line")
    assert reply_text("f", "{}") == "f\n{}" and reply_text("", "x") == "x"


# ---------------------------------------------------------------- the shipped sample

def test_shipped_chat_sample_regenerates_and_uses_the_tiny_tokenizers_pieces(tmp_path):
    subprocess.run([sys.executable, "tools/make_sample_data.py", "--out", str(tmp_path)], cwd=REPO, check=True,
                   capture_output=True)
    for name in ("chat_train.json", "chat_dev.json", "train.json", "dev.json"):
        assert (tmp_path / name).read_bytes() == (SAMPLE / name).read_bytes(), name
    tok = ChatGLM3Tokenizer(SAMPLE / "tokenizer.model")
    kinds = {"tool": 0, "rounds": 0, "single": 0}
    for name in ("chat_train.json", "chat_dev.json"):
        records, _, stats = load(SAMPLE / name, tok, src=192, tgt=71)  # the chat config's lengths
        assert stats["samples"] == len(records) == stats["lines_read"]
        assert stats["dropped_turns"] == stats["truncated_target"] == 0   # every line fits whole
        for r in records:
            roles = [m.role for m in r.messages]
            kinds["tool" if "observation" in roles else "rounds" if roles.count("user") > 1 else "single"] += 1
            for m in r.messages:
                # every CJK character is one of the tokenizer's own pieces, never 3 byte-fallback tokens
                pieces = tok.sp.encode(m.content, out_type=str)
                cjk = [p for p in pieces if any(unicodedata.name(c, "").startswith("CJK") for c in p)]
                assert not [p for p in pieces if p.startswith("<0x") and int(p[3:5], 16) >= 0x80], m.content
                assert cjk or m.role in ("system",)
    assert min(kinds.values()) >= 10, kinds


# ---------------------------------------------------------------- fine-tune and answer (the CLI, as a user would)

def test_tiny_glm3_learns_the_shipped_conversations_and_answers_tool_calls(tmp_path):
    """Fine-tune on the first 12 lines of the shipped sample (tool calls, two-round and single requests; 60 epochs,
    ~30 s on an idle 2-core machine), then predict on prompts taken from it: the tool call (name + JSON arguments) after the system turn with tools,
    the answer after the observation, and the second round of a dialogue: each is the trained reply, greedy;
    eval on the same lines scores them against those replies."""
    lines = (SAMPLE / "chat_train.json").read_text(encoding="utf-8").splitlines()[:12]
    rows = [json.loads(line) for line in lines]
    train = write_lines(tmp_path / "train.json", lines)
    tool_row = next(r for r in rows if "tools" in r)
    rounds_row = next(r for r in rows if sum(m["role"] == "user" for m in r["conversations"]) == 2)
    call_at = next(i for i, m in enumerate(tool_row["conversations"]) if m.get("metadata"))
    prompts = write_lines(tmp_path / "prompts.json", [
        {"tools": tool_row["tools"], "conversations": tool_row["conversations"][:call_at + 1]},  # -> the tool call
        tool_row, rounds_row])
    out = tmp_path / "run"
    proc = run_glm("--config", "configs/glm3/run_glm3_tiny_chat.yaml", "--run_mode", "finetune",
                   f"train_dataset.data_loader.dataset_dir={train}", f"output_dir={out}", "runner_config.epochs=60",
                   "lr_schedule.learning_rate=3.e-3", "lr_schedule.warmup_steps=5", timeout=900)
    rows_per_epoch = json.loads((out / "data_stats.json").read_text())["packing"]["rows"]   # packed conversations
    steps = int(re.search(r"(\d+) steps/epoch x 60 epochs", proc.stdout)[1])
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()
              if '"loss"' in line]
    assert rows_per_epoch < 12 and len(losses) == 60 * steps and losses[0] > 5 and np.mean(losses[-10:]) < 0.02 * losses[0]
    ckpt = next((out / "checkpoint_network").rglob("*.ckpt"))
    run_glm("--config", "configs/glm3/run_glm3_tiny_chat.yaml", "--run_mode", "predict", "--predict_data",
            str(prompts), f"--load_checkpoint={ckpt}", f"output_dir={out}", timeout=600)
    results = [json.loads(line) for line in (out / "predict_results.jsonl").read_text(encoding="utf-8").splitlines()]
    call = tool_row["conversations"][call_at]
    assert results[0]["reference"] == f"find_item\n{call['content']}"
    for r in results:
        assert r["response"] == r["reference"], r
    # Eval on the same file: prompts up to the last assistant turn, the tool call scored as "name\n{arguments}".
    run_glm("--config", "configs/glm3/run_glm3_tiny_chat.yaml", "--run_mode", "eval", f"--load_checkpoint={ckpt}",
            f"eval_dataset.data_loader.dataset_dir={prompts}", f"output_dir={out}", timeout=600)
    preds = [json.loads(line) for line in (out / "predictions.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [(p["prediction"], p["reference"]) for p in preds] == [(r["reference"], r["reference"]) for r in results]
    assert json.loads((out / "metrics.json").read_text())["rouge-l"] == pytest.approx(100.0)
