"""bench/RESULTS.md is one `## ` section per benchmark; each script rewrites only its own section."""

from __future__ import annotations

from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def write_section(heading: str, body: str) -> None:
    """Replace the section titled `heading` (up to the next `## ` heading) with `body`, or append it."""
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    block = heading + "\n\n" + body.strip() + "\n"
    if heading in text:
        start = text.index(heading)
        nxt = text.find("\n## ", start + len(heading))
        text = text[:start] + block + ("\n" + text[nxt + 1:] if nxt != -1 else "")
    else:
        text = text.rstrip() + "\n\n" + block
    RESULTS.write_text(text)
