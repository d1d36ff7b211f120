"""Write the small sample sets shipped in data/sample (original text, written for this project).

ADGEN itself is research data and is never copied here. These lines come from an attribute vocabulary and
hand-written sentence templates, so every summary is a function of its content attributes (plus a seeded
choice of phrasing) and a tiny model can learn the mapping.

chat_train.json / chat_dev.json are ChatGLM3 conversations (format: conversations) over the same vocabulary, so
the shipped tiny tokenizer (trained on train.json + dev.json only) encodes them with its own pieces; the tool
name, JSON punctuation and system line are ASCII (one byte-fallback token a character). Three kinds of lines:
a single request, two rounds where the second changes one attribute of the first item, and a tool call
(the system turn carries the tools; the assistant calls `find_item` with the user's attributes as JSON
arguments, the observation returns more attributes, and the reply describes them all). Replies are a
deterministic function of the attributes, so a model can answer unseen requests exactly.

Regenerate (deterministic; the chat files use their own random stream, so the ADGEN files do not change):
    python tools/make_sample_data.py --out data/sample --train 300 --dev 40 --seed 1234
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # a checkout, not installed

from glm.io import write_text_atomic  # noqa: E402

KINDS = {
    "裙": {"裙长": ["短裙", "中长裙", "长裙"], "裙型": ["a字裙", "百褶裙", "包臀裙"]},
    "上衣": {"衣样式": ["衬衫", "t恤", "卫衣", "针织衫"], "衣袖长": ["短袖", "长袖", "七分袖"]},
    "裤": {"裤长": ["九分裤", "长裤", "短裤"], "裤型": ["阔腿裤", "直筒裤", "哈伦裤"]},
    "外套": {"衣样式": ["风衣", "夹克", "西装"], "衣长": ["短款", "中长款"]},
}
COLORS = ["红色", "白色", "黑色", "蓝色", "粉色", "绿色", "卡其色", "灰色"]
MATERIALS = ["棉", "雪纺", "牛仔布", "羊毛", "真丝", "亚麻"]
STYLES = ["简约", "通勤", "甜美", "复古", "休闲", "文艺"]
PATTERNS = ["纯色", "条纹", "格子", "碎花", "印花", "刺绣"]
FITS = ["宽松", "修身", "直筒"]

# One phrase per attribute value; the summary stitches the phrases of the line's attributes together.
COLOR_TXT = {"红色": "热情的红色显得气色很好", "白色": "干净的白色清爽又百搭", "黑色": "经典的黑色低调显瘦",
             "蓝色": "清新的蓝色带来夏日凉意", "粉色": "温柔的粉色满满少女感", "绿色": "自然的绿色充满生机",
             "卡其色": "耐看的卡其色很有质感", "灰色": "高级的灰色沉稳大方"}
MATERIAL_TXT = {"棉": "柔软的棉质面料亲肤透气", "雪纺": "轻盈的雪纺面料飘逸灵动", "牛仔布": "耐穿的牛仔面料挺括有型",
                "羊毛": "温暖的羊毛面料细腻保暖", "真丝": "顺滑的真丝面料光泽柔和", "亚麻": "天然的亚麻面料舒爽透气"}
STYLE_TXT = {"简约": "简约的设计不失格调", "通勤": "干练的通勤风适合上班穿着", "甜美": "甜美的风格减龄又可爱",
             "复古": "复古的韵味耐人寻味", "休闲": "休闲的风格穿着轻松自在", "文艺": "文艺的气质安静又温柔"}
PATTERN_TXT = {"纯色": "纯色的款式简单耐看", "条纹": "利落的条纹增添层次", "格子": "经典的格子元素很有学院味",
               "碎花": "浪漫的碎花点缀其间", "印花": "别致的印花吸引目光", "刺绣": "精致的刺绣彰显细节"}
FIT_TXT = {"宽松": "宽松的版型遮肉又舒适", "修身": "修身的版型勾勒出好身材", "直筒": "直筒的版型利落显高"}
PART_TXT = {
    "短裙": "短裙的长度露出双腿显得高挑", "中长裙": "中长的裙摆优雅知性", "长裙": "长长的裙摆走起路来摇曳生姿",
    "a字裙": "a字裙型遮住胯部", "百褶裙": "百褶的裙摆灵动活泼", "包臀裙": "包臀的剪裁展现曲线",
    "衬衫": "衬衫的翻领干练有型", "t恤": "t恤的圆领简单舒适", "卫衣": "卫衣的连帽设计很有活力",
    "针织衫": "针织衫的纹理温柔细腻", "短袖": "短袖清凉透气", "长袖": "长袖的设计适合春秋", "七分袖": "七分袖露出纤细手腕",
    "九分裤": "九分的长度露出脚踝", "长裤": "长裤的线条拉长腿型", "短裤": "短裤清爽利落",
    "阔腿裤": "阔腿的裤型遮住腿部线条", "直筒裤": "直筒的裤型修饰腿型", "哈伦裤": "哈伦裤型休闲随性",
    "风衣": "风衣的翻领大气洒脱", "夹克": "夹克的立领帅气利落", "西装": "西装的剪裁干练挺括",
    "短款": "短款的长度拉高腰线", "中长款": "中长款的长度更显气场",
}
OPENERS = {"裙": ["这款裙子", "这条裙子", "这款半身裙"], "上衣": ["这款上衣", "这件上衣"],
           "裤": ["这款裤子", "这条裤子"], "外套": ["这款外套", "这件外套"]}
CLOSERS = ["，日常穿着很出彩。", "，轻松穿出好气质。", "，是衣橱里的必备单品。", "，搭配起来毫不费力。"]
PARTS = {"颜色": COLOR_TXT, "材质": MATERIAL_TXT, "风格": STYLE_TXT, "图案": PATTERN_TXT, "版型": FIT_TXT}


def make_line(rng: random.Random) -> dict:
    kind = rng.choice(sorted(KINDS))
    attrs = [("类型", kind)]
    for key, values in KINDS[kind].items():
        attrs.append((key, rng.choice(values)))
    pool = [("颜色", COLORS), ("材质", MATERIALS), ("风格", STYLES), ("图案", PATTERNS), ("版型", FITS)]
    for key, values in rng.sample(pool, rng.randint(2, 4)):
        attrs.append((key, rng.choice(values)))
    content = "*".join(f"{k}#{v}" for k, v in attrs)
    phrases = [PART_TXT[v] if k not in PARTS else PARTS[k][v] for k, v in attrs[1:]]
    summary = rng.choice(OPENERS[kind]) + "，" + "，".join(phrases) + rng.choice(CLOSERS)
    return {"content": content, "summary": summary}


# ---------------------------------------------------------------- chat sample (format: conversations)
CHAT_SYSTEM = "Shop assistant."
CHAT_TOOLS = [{"name": "find_item", "parameters": {"类型": "string", "颜色": "string"}}]
CHAT_CLOSER = "，是衣橱里的必备单品。"
PART_KEYS = {k: key for k, values in KINDS.items() for key in values}


def chat_reply(attrs: list[tuple[str, str]]) -> str:
    kind = attrs[0][1]
    phrases = [PART_TXT[v] if k not in PARTS else PARTS[k][v] for k, v in attrs[1:]]
    return OPENERS[kind][0] + "，" + "，".join(phrases) + CHAT_CLOSER


def chat_attrs(rng: random.Random) -> list[tuple[str, str]]:
    kind = rng.choice(sorted(KINDS))
    key = rng.choice(sorted(KINDS[kind]))
    return [("类型", kind), (key, rng.choice(KINDS[kind][key])), ("颜色", rng.choice(COLORS))]


def as_content(attrs: list[tuple[str, str]]) -> str:
    return "*".join(f"{k}#{v}" for k, v in attrs)


def find_item(kind: str, color: str) -> list[tuple[str, str]]:
    """The shop's "inventory": a fixed function of (类型, 颜色), as a real lookup would be."""
    k, c = sorted(KINDS).index(kind), COLORS.index(color)
    key = sorted(KINDS[kind])[c % 2]
    values = KINDS[kind][key]
    return [(key, values[(c + k) % len(values)]), ("材质", MATERIALS[(3 * c + k) % len(MATERIALS)]),
            ("图案", PATTERNS[(c + 2 * k) % len(PATTERNS)])]


def make_chat_line(rng: random.Random) -> dict:
    attrs = chat_attrs(rng)
    kind = rng.choice(["single", "rounds", "tool", "tool"])
    if kind == "single":
        return {"conversations": [{"role": "user", "content": as_content(attrs)},
                                  {"role": "assistant", "content": chat_reply(attrs)}]}
    if kind == "rounds":
        key, values = rng.choice([("颜色", COLORS), ("材质", MATERIALS), ("图案", PATTERNS)])
        change = (key, rng.choice([v for v in values if (key, v) not in attrs]))
        second = [a for a in attrs if a[0] != key] + [change]
        first_turn = {"role": "assistant", "content": chat_reply(attrs)}
        if rng.random() < 0.2:
            first_turn["loss"] = False  # kept as context, not trained on
        return {"conversations": [{"role": "user", "content": as_content(attrs)}, first_turn,
                                  {"role": "user", "content": as_content([change])},
                                  {"role": "assistant", "content": chat_reply(second)}]}
    asked = [attrs[0], attrs[2]]  # the tool is asked by 类型 and 颜色 ...
    found = find_item(attrs[0][1], attrs[2][1])  # ... and returns the rest
    return {"tools": CHAT_TOOLS,
            "conversations": [
                {"role": "system", "content": CHAT_SYSTEM},
                {"role": "user", "content": as_content(asked)},
                {"role": "assistant", "metadata": "find_item",
                 "content": json.dumps(dict(asked), ensure_ascii=False)},
                {"role": "observation", "content": json.dumps(dict(found), ensure_ascii=False)},
                {"role": "assistant", "content": chat_reply([attrs[0], *found, attrs[2]])}]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="data/sample")
    ap.add_argument("--train", type=int, default=300)
    ap.add_argument("--dev", type=int, default=40)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--chat-train", type=int, default=160)
    ap.add_argument("--chat-dev", type=int, default=24)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    out = Path(args.out)
    for name, n in (("train.json", args.train), ("dev.json", args.dev)):
        lines = [json.dumps(make_line(rng), ensure_ascii=False) for _ in range(n)]
        write_text_atomic(out / name, "\n".join(lines) + "\n")
        print(f"wrote {n} lines to {out / name}")
    chat_rng = random.Random(args.seed + 1)
    for name, n in (("chat_train.json", args.chat_train), ("chat_dev.json", args.chat_dev)):
        lines = [json.dumps(make_chat_line(chat_rng), ensure_ascii=False) for _ in range(n)]
        write_text_atomic(out / name, "\n".join(lines) + "\n")
        print(f"wrote {n} conversations to {out / name}")


if __name__ == "__main__":
    main()
