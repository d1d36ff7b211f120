"""HCCL rank tables ("version 1.0"): read and check, write one server's, merge several servers'.

    {"version": "1.0", "server_count": "1",
     "server_list": [{"server_id": "10.0.0.1", "host_nic_ip": "reserve",
                      "device": [{"device_id": "0", "device_ip": "192.168.100.101", "rank_id": "0"}, ...]}],
     "status": "completed"}

Every value is a string. The commands are `glm rank-table` and `glm merge-rank-tables`; the launcher
checks a table with `check_rank_table` before it starts any rank. No MindSpore here.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import socket
import subprocess
from typing import Any

from glm import GLMError
from glm.io import write_json_atomic


def load_rank_table(path: str) -> dict[str, Any]:
    """Read and validate a rank-table JSON file; raise GLMError naming the file and the problem."""
    if not os.path.isfile(path):
        raise GLMError(f"rank table {path}: no such file")
    try:
        with open(path, encoding="utf-8") as f:
            table = json.load(f)
    except (OSError, UnicodeDecodeError) as e:
        raise GLMError(f"rank table {path}: cannot read it ({e})") from e
    except json.JSONDecodeError as e:
        raise GLMError(f"rank table {path}: not valid JSON (line {e.lineno}: {e.msg})") from e
    validate_rank_table(table, path)
    return table


def _str_int(value: Any, what: str, where: str) -> int:
    if not isinstance(value, str):
        raise GLMError(f"rank table {where}: {what} must be a string, got {value!r}")
    if not value.isdigit():
        raise GLMError(f"rank table {where}: {what} must be a non-negative integer string, got {value!r}")
    return int(value)


def _require(obj: dict[str, Any], key: str, what: str, where: str) -> Any:
    if not isinstance(obj, dict) or key not in obj:
        raise GLMError(f"rank table {where}: {what} has no {key!r}")
    return obj[key]


def validate_rank_table(d: dict[str, Any], where: str = "<rank table>") -> None:
    """Check the HCCL 1.0 schema and the rank numbering; raise GLMError on the first problem found."""
    if not isinstance(d, dict):
        raise GLMError(f"rank table {where}: expected a JSON object, got {type(d).__name__}")
    version = _require(d, "version", "the table", where)
    if version != "1.0":
        raise GLMError(f"rank table {where}: version must be \"1.0\", got {version!r}")
    status = _require(d, "status", "the table", where)
    if status != "completed":
        raise GLMError(f"rank table {where}: status must be \"completed\", got {status!r}")
    server_count = _str_int(_require(d, "server_count", "the table", where), "server_count", where)
    servers = _require(d, "server_list", "the table", where)
    if not isinstance(servers, list) or not servers:
        raise GLMError(f"rank table {where}: server_list must be a non-empty list")
    if server_count != len(servers):
        raise GLMError(f"rank table {where}: server_count is {server_count} but server_list has "
                       f"{len(servers)} servers")

    rank_owner: dict[int, str] = {}
    ip_owner: dict[str, str] = {}
    server_ids: set[str] = set()
    for s_idx, server in enumerate(servers):
        sid = _require(server, "server_id", f"server #{s_idx}", where)
        if not isinstance(sid, str) or not sid:
            raise GLMError(f"rank table {where}: server #{s_idx} has an empty or non-string server_id")
        if sid in server_ids:
            raise GLMError(f"rank table {where}: server_id {sid} appears twice")
        server_ids.add(sid)
        devices = _require(server, "device", f"server {sid}", where)
        if not isinstance(devices, list) or not devices:
            raise GLMError(f"rank table {where}: server {sid} has an empty device list")
        device_ids: set[int] = set()
        for d_idx, dev in enumerate(devices):
            what = f"server {sid} device #{d_idx}"
            device_id = _str_int(_require(dev, "device_id", what, where), f"{what} device_id", where)
            if device_id in device_ids:
                raise GLMError(f"rank table {where}: device_id {device_id} appears twice on server {sid}")
            device_ids.add(device_id)
            ip = _require(dev, "device_ip", what, where)
            if not isinstance(ip, str) or not ip:
                raise GLMError(f"rank table {where}: {what} has an empty or non-string device_ip")
            if ip in ip_owner:
                raise GLMError(f"rank table {where}: device_ip {ip} appears twice "
                               f"(servers {ip_owner[ip]} and {sid})")
            ip_owner[ip] = sid
            rank = _str_int(_require(dev, "rank_id", what, where), f"{what} rank_id", where)
            if rank in rank_owner:
                raise GLMError(f"rank table {where}: rank_id {rank} appears twice "
                               f"(servers {rank_owner[rank]} and {sid})")
            rank_owner[rank] = sid

    n = len(rank_owner)
    missing = sorted(set(range(n)) - set(rank_owner))
    if missing:
        raise GLMError(f"rank table {where}: rank_ids must be 0..{n - 1}; missing {missing[:5]}, "
                       f"found {sorted(set(rank_owner) - set(range(n)))[:5]}")


def rank_table_size(d: dict[str, Any]) -> int:
    """Total number of ranks (devices over all servers) of a validated table."""
    return sum(len(s["device"]) for s in d["server_list"])

def check_rank_table(path: str, rank_size: int | None = None) -> dict[str, Any]:
    """Load and validate `path`; with `rank_size`, its number of ranks must match. Returns the table."""
    table = load_rank_table(path)
    n = rank_table_size(table)
    if rank_size is not None and n != rank_size:
        raise GLMError(f"rank table {path}: it has {n} ranks but RANK_SIZE is {rank_size}")
    return table


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


def write_server_rank_table(device_num: str = "[0,8)", visible_devices: str = "0,1,2,3,4,5,6,7",
                            server_ip: str = "", device_num_per_node: int = 8, device_ips: str = "",
                            hccn_conf: str = HCCN_CONF, output: str = "") -> tuple[str, dict[str, Any]]:
    """Write the rank table of this server's devices `device_num` (a range like [0,8) into
    `visible_devices`) to `output` (default ./hccl_{N}p_{ids}_{server_ip}.json); returns the path and table.
    Device IPs come from `device_ips`, else hccn_tool, else hccn.conf."""
    first, last = parse_device_range(device_num, device_num_per_node)
    listed = parse_list(visible_devices, "--visible_devices")
    if not all(x.isdigit() for x in listed):
        raise GLMError(f"--visible_devices must be comma-separated integers, got {visible_devices!r}")
    visible = [int(x) for x in listed]
    if last > len(visible):
        raise GLMError(f"--device_num {device_num} needs {last} visible devices, "
                       f"--visible_devices lists {len(visible)}")
    device_ids = visible[first:last]
    if device_ips:
        ips = parse_list(device_ips, "--device_ips")
        if len(ips) != len(device_ids):
            raise GLMError(f"--device_ips lists {len(ips)} IPs for {len(device_ids)} devices {device_ids}")
    else:
        ips = lookup_device_ips(device_ids, hccn_conf)
    server_ip = server_ip or socket.gethostbyname(socket.gethostname())
    table = build_rank_table(server_ip, device_ids, ips)
    out = output or f"hccl_{len(device_ids)}p_{''.join(str(d) for d in device_ids)}_{server_ip}.json"
    write_json_atomic(table, out, indent=4)
    return out, table


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


def merge_rank_table_files(files: list[str], output: str = "") -> tuple[str, dict[str, Any]]:
    """Merge the tables in `files` (servers in argument order) into `output`
    (default ./hccl_{servers}s_{ranks}p.json); returns the path and the table."""
    merged = merge_rank_tables([load_rank_table(f) for f in files])
    out = output or f"hccl_{merged['server_count']}s_{rank_table_size(merged)}p.json"
    write_json_atomic(merged, out, indent=4)
    return out, merged

