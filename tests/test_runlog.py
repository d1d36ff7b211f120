"""Run observability without training: run ids and config hashes, the log-file tee, the curves drawn from
metrics.jsonl / eval_metrics.jsonl (also half-written, also from files older than run ids)."""

from __future__ import annotations

import json
import re
import sys

import pytest

from glm import GLMError
from glm.runlog import (
    _figure,
    by_run,
    config_hash,
    fmt,
    log_to_file,
    new_run_id,
    plot_run,
    read_jsonl,
    write_to_log,
)


def write_metrics(path, runs: dict, half_line: bool = False) -> None:
    """runs: run_id (None: a line from before run ids) -> list of (step, loss)."""
    with open(path, "w", encoding="utf-8") as f:
        for rid, points in runs.items():
            for step, loss in points:
                rec = {"step": step, "epoch": 1, "loss": loss, "lr": 1e-3 * step, "grad_norm": 2.0 / step,
                       "finite": True, "step_time_s": 0.1, "tokens_per_s": 1000.0 + step}
                if rid:
                    rec.update(run_id=rid, config_hash="abc123abc123")
                f.write(json.dumps(rec) + "\n")
        if half_line:
            f.write('{"step": 99, "loss": 0.')


def curves(fig) -> dict[str, int]:
    """legend label -> number of points of that curve"""
    ax = fig.axes[0]
    return {line.get_label(): len(line.get_xdata()) for line in ax.get_lines() if not line.get_label().startswith("_")}


def test_run_id_and_config_hash():
    a, b = new_run_id(), new_run_id()
    assert a != b and len(a) == len("20261201-061700-3fa2") and a[8] == "-"
    cfg = {"seed": 0, "model": {"model_config": {"num_layers": 2}}, "output_dir": "./a", "resume_training": False}
    h = config_hash(cfg)
    assert len(h) == 12 and int(h, 16) >= 0
    # where and whether to continue do not change the hash; what is trained does
    assert config_hash({**cfg, "output_dir": "./b", "resume_training": True}) == h
    assert config_hash({**cfg, "seed": 1}) != h
    assert config_hash({**cfg, "model": {"model_config": {"num_layers": 3}}}) != h


def test_plot_run_one_curve_per_run_id_with_labelled_axes(tmp_path):
    write_metrics(tmp_path / "metrics.jsonl", {"r1": [(s, 8.0 - s / 10) for s in range(1, 31)],
                                              "r2": [(s, 5.0 - s / 100) for s in range(31, 41)]}, half_line=True)
    files = plot_run(tmp_path)
    names = sorted(f.name for f in files)
    assert names == ["grad_norm.png", "learning_rate.png", "loss.png", "tokens_per_s.png"]
    for f in files:
        assert f.parent == tmp_path / "plots" and f.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f.stat().st_size > 5000
    assert not [f for f in (tmp_path / "plots").iterdir() if f.name.startswith(".")]   # atomic writes
    runs = by_run(read_jsonl(tmp_path / "metrics.jsonl"))
    assert list(runs) == ["r1", "r2"] and [len(v) for v in runs.values()] == [30, 10]   # half line skipped
    fig = _figure(runs, "loss", "training loss", "t", smooth=True)
    ax = fig.axes[0]
    assert ax.get_xlabel() == "optimizer step" and ax.get_ylabel() == "training loss"
    # r1 (30 points) is drawn raw + smoothed (one legend entry), r2 (10 points) raw
    assert curves(fig) == {"r1 (config abc123abc123), smoothed": 30, "r2 (config abc123abc123), smoothed": 10}
    fig = _figure(runs, "lr", "learning rate", "t", smooth=False)
    assert curves(fig) == {"r1 (config abc123abc123)": 30, "r2 (config abc123abc123)": 10}
    assert list(fig.axes[0].get_lines()[1].get_ydata()) == pytest.approx([1e-3 * s for s in range(31, 41)])


def test_lines_from_before_run_ids_are_split_where_the_step_goes_back(tmp_path):
    write_metrics(tmp_path / "metrics.jsonl", {None: [(1, 7.0), (2, 6.0), (3, 5.0), (1, 7.1), (2, 6.1)]})
    with open(tmp_path / "metrics.jsonl", "a") as f:   # then a resumed run that has an id
        f.write(json.dumps({"step": 3, "loss": 5.5, "run_id": "new"}) + "\n")
    runs = by_run(read_jsonl(tmp_path / "metrics.jsonl"))
    assert {k: [r["step"] for r in v] for k, v in runs.items()} == {"run 1": [1, 2, 3], "run 2": [1, 2], "new": [3]}


def test_eval_metrics_are_drawn_when_present(tmp_path):
    write_metrics(tmp_path / "metrics.jsonl", {"r1": [(s, 1.0) for s in range(1, 5)]})
    with open(tmp_path / "eval_metrics.jsonl", "w") as f:
        for step in (2, 4):
            f.write(json.dumps({"step": step, "epoch": 1, "samples": 8, "rouge-1": 10.0 * step, "bleu-4": 1.0 * step,
                                "eval_loss": 3.0 / step, "run_id": "r1"}) + "\n")
    names = sorted(f.name for f in plot_run(tmp_path))
    assert {"eval_rouge-1.png", "eval_bleu-4.png", "eval_eval_loss.png"} <= set(names)
    assert "eval_samples.png" not in names and "eval_epoch.png" not in names


def test_plot_run_errors_name_the_folder(tmp_path):
    with pytest.raises(GLMError, match="no such run folder"):
        plot_run(tmp_path / "nope")
    with pytest.raises(GLMError, match=f"{tmp_path}: no metrics.jsonl"):
        plot_run(tmp_path)


def test_log_to_file_copies_both_streams_and_the_error(tmp_path, capsys):
    log = tmp_path / "log" / "glm.log"
    with log_to_file(log, "=== header"):
        print("hello")
        print("warning: careful", file=sys.stderr)
        write_to_log("file only")
    with pytest.raises(GLMError), log_to_file(log):
        print("second run")
        raise GLMError("bad thing")
    out, err = capsys.readouterr()
    assert out == "hello\nsecond run\n" and err == "warning: careful\n"
    assert log.read_text().splitlines() == ["=== header", "hello", "warning: careful", "file only", "second run",
                                            "error: bad thing"]


def test_fmt():
    assert fmt(7.544723987579346) == "7.5447" and fmt(0.7550022602081299) == "0.7550"
    assert fmt(1.5e-5) == "1.5e-05" and fmt(3) == "3.0000" and fmt(None) == "None"


# ------------------------------------------------------------------------- a real run (the shared tiny_run)
def read_tensorboard(folder) -> dict[str, list[tuple[int, float]]]:
    """Scalars of the TensorBoard event files in `folder`, read back from the TFRecord framing
    (u64 length, u32 crc, payload, u32 crc) with tensorboardX's Event protobuf."""
    import struct

    from tensorboardX.proto.event_pb2 import Event

    scalars: dict[str, list[tuple[int, float]]] = {}
    files = sorted(folder.glob("events.out.tfevents.*"))
    assert files, f"no event file in {folder}"
    for path in files:
        data = path.read_bytes()
        pos = 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            event = Event.FromString(data[pos + 12:pos + 12 + length])
            pos += 12 + length + 4
            for v in event.summary.value:
                scalars.setdefault(v.tag, []).append((event.step, v.simple_value))
    return scalars


def test_a_training_run_leaves_a_log_curves_and_tensorboard_events(tiny_run):
    """The README's first command, shortened to 8 steps with tensorboard.tensorboard_dir set."""
    records = tiny_run.records
    run_id, cfg_hash = records[0]["run_id"], records[0]["config_hash"]
    assert {(r["run_id"], r["config_hash"]) for r in records} == {(run_id, cfg_hash)} and len(records) == 8
    summary = tiny_run.summary
    assert (summary["run_id"], summary["config_hash"]) == (run_id, cfg_hash)
    # glm.log: the header naming the run, then the terminal's lines, the done line with rounded losses
    log = tiny_run.log.splitlines()
    assert log[0].startswith(f"=== run {run_id} (finetune, config {cfg_hash}) started ")
    assert any(line.startswith("training: 887,936 parameters") for line in log)
    assert any(line.startswith("step 1/8 epoch 1 loss ") for line in log)
    first, last = records[0]["loss"], records[-1]["loss"]
    done = [line for line in log if line.startswith("done: ")]
    assert len(done) == 1 and done[0].endswith(f"; weights: {tiny_run.weights}")
    # metrics.jsonl keeps 6 decimals of the loss, the done line rounds the full value to 4: compare as numbers
    shown = re.fullmatch(r"done: 8 steps, loss (\d+\.\d{4}) -> (\d+\.\d{4}); weights: .*", done[0])
    assert shown and [float(x) for x in shown.groups()] == pytest.approx([first, last], abs=1.01e-4)
    # curves: one PNG per scalar, listed in the summary
    plots = tiny_run.out / "plots"
    assert sorted(p.name for p in plots.iterdir()) == ["grad_norm.png", "learning_rate.png", "loss.png",
                                                      "tokens_per_s.png"]
    assert summary["plots"] == [str(plots / n) for n in ("loss.png", "learning_rate.png", "grad_norm.png",
                                                         "tokens_per_s.png")]
    # TensorBoard: <tensorboard_dir>/<run_id>/, the metrics.jsonl scalars at their steps
    tb = read_tensorboard(tiny_run.out / "tensorboard" / run_id)
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "step_time_s"):
        assert [s for s, _ in tb[f"train/{key}"]] == [r["step"] for r in records]
        assert [v for _, v in tb[f"train/{key}"]] == pytest.approx([r[key] for r in records], rel=1e-6)
