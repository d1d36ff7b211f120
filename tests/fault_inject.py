"""Run `run_glm.py` with a fault injected into MindSpore's checkpoint writer, as an unlucky operator meets it.

    python tests/fault_inject.py MODE N run_glm.py-args...

MODE, at the N-th checkpoint write (1-based), after half of MindSpore's own `<name>.tmp` is on disk:
- `kill`:   SIGKILL this process (a kill -9 or an OOM kill during the write);
- `hang`:   print "HANGING <pid>" and sleep (a long write another run can collide with);
- `enospc`: raise OSError(ENOSPC) as a full disk does.
Only the test harness uses this (and `sigkill_when_written`, a kill -9 at a chosen moment); the product
has no fault hooks.
"""

from __future__ import annotations

import errno
import os
import runpy
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def sigkill_when_written(cmd: list[str], target: Path, timeout: float) -> None:
    """Start `cmd` in the repo and kill -9 it as soon as `target` exists (or it exits, or `timeout` passes)."""
    p = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    while not target.exists() and p.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()


def main() -> None:
    mode, when, args = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    sys.path.insert(0, str(REPO))
    import mindspore

    real = mindspore.save_checkpoint
    calls = [0]

    def faulty(save_obj, ckpt_file_name, *a, **k):
        calls[0] += 1
        if calls[0] != when:
            return real(save_obj, ckpt_file_name, *a, **k)
        inner = Path(ckpt_file_name).with_suffix(".tmp")   # where MindSpore writes first
        inner.write_bytes(b"\0" * 4096)
        if mode == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if mode == "hang":
            print(f"HANGING {os.getpid()}", flush=True)
            time.sleep(600)
        raise OSError(errno.ENOSPC, "No space left on device", str(inner))

    mindspore.save_checkpoint = faulty
    sys.argv = [str(REPO / "run_glm.py"), *args]
    runpy.run_path(str(REPO / "run_glm.py"), run_name="__main__")


if __name__ == "__main__":
    main()
