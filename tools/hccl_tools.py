"""Write the HCCL rank table ("version 1.0") of one Ascend server.

    python tools/hccl_tools.py --device_num "[0,8)" --server_ip 10.0.0.1 \
        --device_ips "192.168.100.101,192.168.100.102,..."

Device IPs come from --device_ips (works on any machine), else `hccn_tool -i ID -ip -g`, else the
`address_ID=IP` lines of /etc/hccn.conf. The output is ./hccl_{N}p_{ids}_{server_ip}.json unless
--output is given. `--check FILE [--rank_size N]` validates an existing table instead.
As in the reference, a range crossing device 4 must be the whole server: [0,8) or [0,16).
Merge the tables of several servers with tools/merge_hccl.py.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import subprocess
import sys
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from glm import GLMError  # noqa: E402
from glm.parallel import load_rank_table, rank_table_size, validate_rank_table  # noqa: E402

HCCN_CONF = "/etc/hccn.conf"
WHOLE_SERVER_RANGES = ((0, 8), (0, 16))


def parse_device_range(text: str, per_node: int) -> tuple[int, int]:
    """'[0,8)' -> (0, 8); validates 0 <= first < last <= per_node."""
    m = re.fullmatch(r"\s*\[\s*(\d+)\s*,\s*(\d+)\s*\)\s*", text)
    if not m:
        raise GLMError(f"--device_num must look like [0,8) (first included, last excluded), got {text!r}")
    first, last = int(m.group(1)), int(m.group(2))
    if not 0 <= first < last <= per_node:
        raise GLMError(f"--device_num {text}: need 0 <= first < last <= {per_node} (--device_num_per_node)")
    # Devices 0-3 and 4-7 of an Ascend server are separate HCCS rings (the reference's rule).
    if first < 4 < last and (first, last) not in WHOLE_SERVER_RANGES:
        raise GLMError(f"--device_num {text} crosses device 4: devices 0-3 and 4-7 are separate HCCS groups, "
                       "so a range crossing 4 must be the whole server, [0,8) (or [0,16)); "
                       "use a range within [0,4) or [4,8) instead")
    return first, last


def parse_list(text: str, what: str) -> list[str]:
    items = [x.strip() for x in text.split(",") if x.strip()]
    if not items:
        raise GLMError(f"{what} is empty")
    return items


def _hccn_tool_ip(device_id: int) -> str | None:
    tool = shutil.which("hccn_tool")
    if tool is None:
        return None
    try:
        out = subprocess.run([tool, "-i", str(device_id), "-ip", "-g"], capture_output=True, text=True,
                             timeout=30, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"ipaddr\s*:\s*(\S+)", out) or re.search(r":\s*(\d+\.\d+\.\d+\.\d+)", out)
    return m.group(1) if m else None


def _hccn_conf_ip(device_id: int, conf: str = HCCN_CONF) -> str | None:
    try:
        with open(conf, encoding="utf-8") as f:
            for line in f:
                key, _, value = line.strip().partition("=")
                if key.strip() == f"address_{device_id}" and value.strip():
                    return value.strip()
    except OSError:
        return None
    return None


def lookup_device_ips(device_ids: list[int], conf: str = HCCN_CONF) -> list[str]:
    """Device IPs from hccn_tool, falling back to hccn.conf; GLMError when neither knows a device."""
    ips = []
    for dev in device_ids:
        ip = _hccn_tool_ip(dev) or _hccn_conf_ip(dev, conf)
        if ip is None:
            raise GLMError(f"no IP for device {dev}: hccn_tool is not available and {conf} has no "
                           f"address_{dev}; pass the device IPs with --device_ips ip0,ip1,...")
        ips.append(ip)
    return ips


def build_rank_table(server_ip: str, device_ids: list[int], device_ips: list[str]) -> dict[str, Any]:
    """One-server table; rank_id k for the k-th device, every value a string."""
    if len(device_ids) != len(device_ips):
        raise GLMError(f"{len(device_ids)} devices but {len(device_ips)} device IPs")
    devices = [{"device_id": str(d), "device_ip": ip, "rank_id": str(k)}
               for k, (d, ip) in enumerate(zip(device_ids, device_ips))]
    table = {"version": "1.0", "server_count": "1",
             "server_list": [{"server_id": server_ip, "device": devices, "host_nic_ip": "reserve"}],
             "status": "completed"}
    validate_rank_table(table, "<generated>")
    return table


def write_json_atomic(obj: dict[str, Any], path: str) -> None:
    """JSON (indent 4, as the reference's tables) via the shared atomic writer."""
    from glm.io import write_json_atomic as write

    write(obj, path, indent=4)


def generate(args: argparse.Namespace) -> str:
    first, last = parse_device_range(args.device_num, args.device_num_per_node)
    visible = [int(x) for x in parse_list(args.visible_devices, "--visible_devices") if x.isdigit()]
    if len(visible) != len(parse_list(args.visible_devices, "--visible_devices")):
        raise GLMError(f"--visible_devices must be comma-separated integers, got {args.visible_devices!r}")
    if last > len(visible):
        raise GLMError(f"--device_num {args.device_num} needs {last} visible devices, "
                       f"--visible_devices lists {len(visible)}")
    device_ids = visible[first:last]
    if args.device_ips:
        device_ips = parse_list(args.device_ips, "--device_ips")
        if len(device_ips) != len(device_ids):
            raise GLMError(f"--device_ips lists {len(device_ips)} IPs for {len(device_ids)} devices "
                           f"{device_ids}")
    else:
        device_ips = lookup_device_ips(device_ids, args.hccn_conf)
    server_ip = args.server_ip or socket.gethostbyname(socket.gethostname())
    table = build_rank_table(server_ip, device_ids, device_ips)
    ids = "".join(str(d) for d in device_ids)
    out = args.output or f"hccl_{len(device_ids)}p_{ids}_{server_ip}.json"
    write_json_atomic(table, out)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device_num", default="[0,8)", help="device range of this server, e.g. [0,8) or [0,4)")
    p.add_argument("--visible_devices", default="0,1,2,3,4,5,6,7",
                   help="device ids, indexed by --device_num (default 0,...,7)")
    p.add_argument("--server_ip", default="", help="server_id (default: this host's IP)")
    p.add_argument("--device_num_per_node", type=int, default=8)
    p.add_argument("--device_ips", default="", help="device IPs of the devices in the range, comma-separated")
    p.add_argument("--hccn_conf", default=HCCN_CONF, help=argparse.SUPPRESS)
    p.add_argument("--output", default="", help="output file (default ./hccl_{N}p_{ids}_{server_ip}.json)")
    p.add_argument("--check", metavar="FILE", default="", help="validate FILE instead of writing a table")
    p.add_argument("--rank_size", type=int, default=None, help="with --check: expected number of ranks")
    args = p.parse_args(argv)
    try:
        if args.check:
            table = load_rank_table(args.check)
            n = rank_table_size(table)
            if args.rank_size is not None and n != args.rank_size:
                raise GLMError(f"rank table {args.check}: it has {n} ranks but RANK_SIZE is {args.rank_size}")
            print(f"rank table {args.check}: ok ({table['server_count']} server(s), {n} ranks)")
        else:
            print(f"rank table written to {generate(args)}")
    except GLMError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
