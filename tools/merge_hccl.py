"""Merge one-server HCCL rank tables into a multi-server table.

    python tools/merge_hccl.py hccl_8p_01234567_10.0.0.1.json hccl_8p_01234567_10.0.0.2.json

Servers are taken in argument order and rank_id is renumbered 0..N-1 across all of them. Every
input and the result are validated. The output is ./hccl_{servers}s_{ranks}p.json unless --output.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from glm import GLMError  # noqa: E402
from glm.parallel import load_rank_table, validate_rank_table  # noqa: E402
from tools.hccl_tools import write_json_atomic  # noqa: E402


def merge_rank_tables(tables: list[dict[str, Any]]) -> dict[str, Any]:
    """Concatenate the server lists and renumber rank_id globally (as strings)."""
    servers = [copy.deepcopy(s) for t in tables for s in t["server_list"]]
    rank = 0
    for server in servers:
        for dev in server["device"]:
            dev["rank_id"] = str(rank)
            rank += 1
    merged = {"version": "1.0", "server_count": str(len(servers)), "server_list": servers,
              "status": "completed"}
    validate_rank_table(merged, "<merged>")
    return merged


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("files", nargs="+", help="rank tables from tools/hccl_tools.py, one per server")
    p.add_argument("--output", default="", help="output file (default ./hccl_{servers}s_{ranks}p.json)")
    args = p.parse_args(argv)
    try:
        merged = merge_rank_tables([load_rank_table(f) for f in args.files])
        n_ranks = sum(len(s["device"]) for s in merged["server_list"])
        out = args.output or f"hccl_{merged['server_count']}s_{n_ranks}p.json"
        write_json_atomic(merged, out)
    except GLMError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"merged rank table ({merged['server_count']} servers, {n_ranks} ranks) written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
