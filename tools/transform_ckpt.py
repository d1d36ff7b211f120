#!/usr/bin/env python
"""Kept for old scripts: `python tools/transform_ckpt.py ARGS` is `glm transform-ckpt ARGS` (see `glm transform-ckpt --help`)."""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # a checkout, not installed

from glm.cli import call  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    return call(["transform-ckpt", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
