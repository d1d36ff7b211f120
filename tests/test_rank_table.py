"""Rank tables: `glm rank-table` / `glm merge-rank-tables` (through their old tools/*.py paths) and glm.rank_table."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from glm import GLMError
from glm.cli import call
from glm.rank_table import load_rank_table, parse_device_range, validate_rank_table

REPO = Path(__file__).resolve().parents[1]
HCCL_TOOLS = REPO / "tools" / "hccl_tools.py"
MERGE_HCCL = REPO / "tools" / "merge_hccl.py"


def run_tool(script: Path, *args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(script), *args], cwd=cwd, capture_output=True, text=True,
                          env=env, timeout=60)


def ips(server: int, n: int) -> str:
    return ",".join(f"192.168.{server}.{i + 1}" for i in range(n))


def make_table(tmp_path: Path, server_ip: str, n: int, server: int) -> Path:
    r = run_tool(HCCL_TOOLS, "--device_num", f"[0,{n})", "--server_ip", server_ip,
                 "--device_ips", ips(server, n), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    ids = "".join(str(i) for i in range(n))
    path = tmp_path / f"hccl_{n}p_{ids}_{server_ip}.json"
    assert path.is_file()
    return path


@pytest.mark.parametrize("n", [8, 4])
def test_hccl_tools_one_server(tmp_path: Path, n: int) -> None:
    path = make_table(tmp_path, "10.0.0.1", n, 1)
    text = path.read_text()
    assert text.startswith('{\n    "version": "1.0"')  # indent 4
    table = json.loads(text)
    assert table["server_count"] == "1" and table["status"] == "completed"
    server = table["server_list"][0]
    assert server["server_id"] == "10.0.0.1"
    assert server["device"] == [{"device_id": str(i), "device_ip": f"192.168.1.{i + 1}", "rank_id": str(i)}
                                for i in range(n)]
    load_rank_table(str(path))  # valid
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp-")]


def test_hccl_tools_second_half_and_output(tmp_path: Path) -> None:
    r = run_tool(HCCL_TOOLS, "--device_num", "[4,8)", "--server_ip", "10.0.0.1", "--device_ips",
                 ips(1, 4), "--output", "rt.json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    devices = json.loads((tmp_path / "rt.json").read_text())["server_list"][0]["device"]
    assert [d["device_id"] for d in devices] == ["4", "5", "6", "7"]
    assert [d["rank_id"] for d in devices] == ["0", "1", "2", "3"]


def test_hccl_tools_multi_digit_range(tmp_path: Path) -> None:
    visible = ",".join(str(i) for i in range(16))
    r = run_tool(HCCL_TOOLS, "--device_num", "[10,16)", "--device_num_per_node", "16", "--visible_devices",
                 visible, "--server_ip", "10.0.0.1", "--device_ips", ips(1, 6), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "hccl_6p_101112131415_10.0.0.1.json").is_file()


@pytest.mark.parametrize("device_num, message", [
    ("[0,9)", "0 <= first < last <= 8"),
    ("[4,4)", "0 <= first < last <= 8"),
    ("0-8", "must look like [0,8)"),
    ("[2,6)", "--device_num [2,6) crosses device 4"),
    ("[0,5)", "--device_num [0,5) crosses device 4"),
    ("[3,8)", "a range crossing 4 must be the whole server, [0,8) (or [0,16))"),
])
def test_hccl_tools_bad_range(tmp_path: Path, device_num: str, message: str) -> None:
    r = run_tool(HCCL_TOOLS, "--device_num", device_num, "--device_ips", ips(1, 8), cwd=tmp_path)
    assert r.returncode == 2
    assert message in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("device_num, per_node", [("[0,8)", 8), ("[0,4)", 8), ("[4,8)", 8), ("[3,4)", 8),
                                                  ("[0,16)", 16), ("[4,16)", 16)])
def test_hccl_tools_ranges_not_crossing_4(device_num: str, per_node: int) -> None:
    first, last = parse_device_range(device_num, per_node)
    assert (first, last) == tuple(int(x) for x in device_num.strip("[)").split(","))


def test_hccl_tools_crossing_4_with_16_devices() -> None:
    with pytest.raises(GLMError, match=r"\[0,12\) crosses device 4"):
        parse_device_range("[0,12)", 16)


def fake_hccn_tool(folder: Path, broken: tuple[int, ...] = ()) -> None:
    """An `hccn_tool` that answers `-i ID -ip -g` like the real one (ipaddr/netmask lines)."""
    tool = folder / "hccn_tool"
    listed = " ".join(map(str, broken))
    tool.write_text("#!/bin/sh\n"
                    '[ "$1" = -i ] && [ "$3" = -ip ] && [ "$4" = -g ] || { echo "bad args: $*" >&2; exit 2; }\n'
                    f'case " {listed} " in *" $2 "*) exit 1 ;; esac\n'
                    'echo "ipaddr:192.98.92.$((100 + $2))"\n'
                    'echo "netmask:255.255.255.0"\n')
    tool.chmod(0o755)


def test_hccl_tools_reads_hccn_tool(tmp_path: Path) -> None:
    fake_hccn_tool(tmp_path)
    env = dict(os.environ, PATH=f"{tmp_path}{os.pathsep}{os.environ.get('PATH', '')}")
    r = run_tool(HCCL_TOOLS, "--device_num", "[4,8)", "--server_ip", "10.0.0.1", "--hccn_conf",
                 str(tmp_path / "missing.conf"), cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr
    devices = json.loads((tmp_path / "hccl_4p_4567_10.0.0.1.json").read_text())["server_list"][0]["device"]
    assert [(d["device_id"], d["device_ip"], d["rank_id"]) for d in devices] == [
        ("4", "192.98.92.104", "0"), ("5", "192.98.92.105", "1"), ("6", "192.98.92.106", "2"),
        ("7", "192.98.92.107", "3")]


def test_hccl_tools_falls_back_to_hccn_conf(tmp_path: Path) -> None:
    fake_hccn_tool(tmp_path, broken=(1,))   # hccn_tool fails for device 1 only
    conf = tmp_path / "hccn.conf"
    conf.write_text("address_0=192.168.7.1\naddress_1=192.168.7.2\n")
    env = dict(os.environ, PATH=f"{tmp_path}{os.pathsep}{os.environ.get('PATH', '')}")
    r = run_tool(HCCL_TOOLS, "--device_num", "[0,2)", "--server_ip", "10.0.0.1", "--hccn_conf", str(conf),
                 cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr
    devices = json.loads((tmp_path / "hccl_2p_01_10.0.0.1.json").read_text())["server_list"][0]["device"]
    assert [d["device_ip"] for d in devices] == ["192.98.92.100", "192.168.7.2"]


def test_hccl_tools_wrong_number_of_ips(tmp_path: Path) -> None:
    r = run_tool(HCCL_TOOLS, "--device_num", "[0,8)", "--device_ips", ips(1, 7), cwd=tmp_path)
    assert r.returncode == 2 and "7 IPs for 8 devices" in r.stderr


def test_hccl_tools_without_hccn_tool(tmp_path: Path) -> None:
    env = dict(os.environ, PATH=str(tmp_path))  # no hccn_tool on PATH
    r = run_tool(HCCL_TOOLS, "--device_num", "[0,8)", "--hccn_conf", str(tmp_path / "missing.conf"),
                 cwd=tmp_path, env=env)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert "--device_ips" in lines[0] and "hccn_tool" in lines[0]


def test_hccl_tools_reads_hccn_conf(tmp_path: Path) -> None:
    conf = tmp_path / "hccn.conf"
    conf.write_text("".join(f"address_{i}=192.168.7.{i + 1}\nnetdetect_{i}=1.1.1.1\n" for i in range(8)))
    env = dict(os.environ, PATH=str(tmp_path))
    r = run_tool(HCCL_TOOLS, "--device_num", "[0,2)", "--server_ip", "10.0.0.1", "--hccn_conf", str(conf),
                 cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr
    devices = json.loads((tmp_path / "hccl_2p_01_10.0.0.1.json").read_text())["server_list"][0]["device"]
    assert [d["device_ip"] for d in devices] == ["192.168.7.1", "192.168.7.2"]


def test_merge_two_servers_renumbers(tmp_path: Path) -> None:
    a = make_table(tmp_path, "10.0.0.1", 8, 1)
    b = make_table(tmp_path, "10.0.0.2", 8, 2)
    r = run_tool(MERGE_HCCL, str(a), str(b), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    merged = load_rank_table(str(tmp_path / "hccl_2s_16p.json"))
    assert merged["server_count"] == "2"
    assert [s["server_id"] for s in merged["server_list"]] == ["10.0.0.1", "10.0.0.2"]
    ranks = [d["rank_id"] for s in merged["server_list"] for d in s["device"]]
    assert ranks == [str(i) for i in range(16)]
    assert [d["device_id"] for d in merged["server_list"][1]["device"]] == [str(i) for i in range(8)]


def test_merge_refuses_duplicate_server(tmp_path: Path) -> None:
    a = make_table(tmp_path, "10.0.0.1", 8, 1)
    r = run_tool(MERGE_HCCL, str(a), str(a), cwd=tmp_path)
    assert r.returncode == 2 and "appears twice" in r.stderr


def _two_servers() -> dict:
    return {"version": "1.0", "server_count": "2", "status": "completed", "server_list": [
        {"server_id": "10.0.0.1", "host_nic_ip": "reserve", "device": [
            {"device_id": "0", "device_ip": "192.168.1.1", "rank_id": "0"},
            {"device_id": "1", "device_ip": "192.168.1.2", "rank_id": "1"}]},
        {"server_id": "10.0.0.2", "host_nic_ip": "reserve", "device": [
            {"device_id": "0", "device_ip": "192.168.2.1", "rank_id": "2"},
            {"device_id": "1", "device_ip": "192.168.2.2", "rank_id": "3"}]}]}


def _breaks(fn) -> dict:
    table = copy.deepcopy(_two_servers())
    fn(table)
    return table


@pytest.mark.parametrize("mutate, message", [
    (lambda t: t["server_list"][1]["device"][1].update(rank_id="1"),
     "rank_id 1 appears twice (servers 10.0.0.1 and 10.0.0.2)"),
    (lambda t: t["server_list"][0]["device"][1].pop("device_ip"), "has no 'device_ip'"),
    (lambda t: t.update(server_count="3"), "server_count is 3 but server_list has 2 servers"),
    (lambda t: t["server_list"][0]["device"][1].update(device_id="0"),
     "device_id 0 appears twice on server 10.0.0.1"),
    (lambda t: t["server_list"][1]["device"][0].update(device_ip="192.168.1.1"),
     "device_ip 192.168.1.1 appears twice"),
    (lambda t: t["server_list"][1]["device"][1].update(rank_id="7"), "rank_ids must be 0..3; missing [3]"),
    (lambda t: t["server_list"][0]["device"][0].update(rank_id=0), "must be a string"),
    (lambda t: t.update(version="2.0"), "version must be"),
    (lambda t: t.update(status="pending"), "status must be"),
])
def test_invalid_tables_refused(mutate, message: str) -> None:
    with pytest.raises(GLMError) as e:
        validate_rank_table(_breaks(mutate), "rt.json")
    assert message in str(e.value) and "rt.json" in str(e.value)


def test_valid_table_and_cli(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    validate_rank_table(_two_servers(), "rt.json")
    path = tmp_path / "rt.json"
    path.write_text(json.dumps(_two_servers()))
    assert call(["rank-table", "--check", str(path), "--rank_size", "4"]) == 0
    assert call(["rank-table", "--check", str(path), "--rank_size", "8"]) == 2
    assert "4 ranks but RANK_SIZE is 8" in capsys.readouterr().err
    path.write_text("{not json")
    assert call(["rank-table", "--check", str(path)]) == 2
    assert "not valid JSON" in capsys.readouterr().err
