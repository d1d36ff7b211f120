"""Write the small ADGEN-format sample set shipped in data/sample (original text, written for this project).

ADGEN itself is research data and is never copied here. These lines come from an attribute vocabulary and
hand-written sentence templates, so every summary is a function of its content attributes (plus a seeded
choice of phrasing) and a tiny model can learn the mapping.

Regenerate (deterministic):
    python tools/make_sample_data.py --out data/sample --train 300 --dev 40 --seed 1234
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="data/sample")
    ap.add_argument("--train", type=int, default=300)
    ap.add_argument("--dev", type=int, default=40)
    ap.add_argument("--seed", type=int, default=1234)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, n in (("train.json", args.train), ("dev.json", args.dev)):
        lines = [json.dumps(make_line(rng), ensure_ascii=False) for _ in range(n)]
        (out / name).write_text("\n".join(lines) + "\n", encoding="utf-8")
        print(f"wrote {n} lines to {out / name}")


if __name__ == "__main__":
    main()
