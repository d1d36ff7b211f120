"""Writing files so that a user's work is never half-written, mixed or left as debris.

- `atomic_path(dest)` / `atomic_write(dest)` / `write_text_atomic` / `write_bytes_atomic` /
  `write_json_atomic`: every file goes to a hidden temporary name in the same folder
  (`.<stem>.partial-<host>-<pid><suffix>`), is fsynced, then renamed over `dest` (and the folder
  fsynced), so a crash or a full disk leaves the old file or the new one, never a torn one. On any
  error the temporary file (and MindSpore's own `<temp>.tmp`) is removed before the error propagates.
- `remove_stale_temps(folder)`: temporary files whose writer (a PID on this host) is gone, removed at the
  next start.
- `os_error(e, path)`: a full disk, a read-only file system, a missing permission or a path that is a
  file as a one-line `GLMError` naming the path (and, for a full disk, the space needed and free).
- `output_lock(output_dir)`: one writer per output folder (host + PID in `<output_dir>/.glm-launcher.lock`;
  a second run is refused naming the holder; a lock left by a dead process is taken over with a notice).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import shutil
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Optional, Union

from glm import GLMError

PathLike = Union[str, os.PathLike]
LOCK_NAME = ".glm-launcher.lock"
_TEMP = re.compile(r"^\..+\.partial-(?:(?P<host>.+)-)?(?P<pid>\d+)(?:\.[A-Za-z0-9_]+)*$")
_EXPORT_STAGE = re.compile(r"^\.export-tmp-(?P<pid>\d+)$")   # stage folders of older versions


# ---------------------------------------------------------------------------------------- errors
def human_bytes(n: Optional[float]) -> str:
    if n is None:
        return "?"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def _existing_parent(path: Path) -> Path:
    p = path
    while not p.exists() and p != p.parent:
        p = p.parent
    return p if p.is_dir() else p.parent


def free_bytes(path: PathLike) -> Optional[int]:
    try:
        return shutil.disk_usage(_existing_parent(Path(path).absolute())).free
    except OSError:
        return None


def _first_file_component(path: Path) -> Optional[Path]:
    """The first component of `path` that exists and is not a folder (the reason for ENOTDIR/EEXIST)."""
    p = Path(path).absolute()
    for parent in [*reversed(p.parents), p]:
        if parent.exists() and not parent.is_dir():
            return parent
    return None


def os_error(e: OSError, path: PathLike, needed: Optional[int] = None) -> GLMError:
    """An environment fault while writing `path` as a one-line user error."""
    path = Path(path)
    code = e.errno
    if code in (errno.ENOSPC, errno.EDQUOT):
        free = free_bytes(path)
        need = f"needs about {human_bytes(needed)}, " if needed else ""
        return GLMError(f"{path}: no space left on device ({need}{human_bytes(free)} free); free some space "
                        "or set output_dir to another disk")
    if code == errno.EROFS:
        return GLMError(f"{path}: the file system is read-only; set output_dir to a writable folder")
    if code in (errno.EACCES, errno.EPERM):
        return GLMError(f"{path}: permission denied; set output_dir to a folder you can write to")
    if code in (errno.ENOTDIR, errno.EEXIST):
        blocker = _first_file_component(path)
        if blocker is not None:
            return GLMError(f"{path}: {blocker} is a file, not a folder")
    if code == errno.EISDIR:
        return GLMError(f"{path}: is a folder, expected a file")
    if code == errno.ENOENT:
        return GLMError(f"{path}: folder {path.parent} does not exist")
    return GLMError(f"{path}: cannot write ({e.strerror or e})")


def ensure_dir(path: PathLike) -> Path:
    """`mkdir -p path`, with a path that is a file or an unwritable place as a one-line error."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise GLMError(f"{p}: is a file, not a folder")
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise os_error(e, p) from None
    return p


# ---------------------------------------------------------------------------------------- atomic writes
def temp_path(dest: PathLike) -> Path:
    """The hidden temporary name `dest` is written under: same folder (so the rename is atomic), same
    suffix (MindSpore and safetensors pick the format by it), writer's host and PID (for clean-up)."""
    dest = Path(dest)
    return dest.with_name(f".{dest.stem}.partial-{socket.gethostname()}-{os.getpid()}{dest.suffix}")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove_temp(tmp: Path) -> None:
    # MindSpore's save_checkpoint writes `<stem>.tmp` first and renames it to the name it was given.
    for f in (tmp, tmp.with_suffix(".tmp")):
        try:
            if f.is_dir() and not f.is_symlink():
                shutil.rmtree(f, ignore_errors=True)
            else:
                f.unlink()
        except FileNotFoundError:
            pass
        except OSError:
            pass   # a read-only file system: nothing was written there either


@contextmanager
def atomic_path(dest: PathLike, needed: Optional[int] = None) -> Iterator[Path]:
    """Yield a temporary path for a writer that wants a file name (MindSpore, safetensors); when the block
    ends without error it is fsynced and renamed to `dest`. On any error it is removed; OS errors (full
    disk, read-only, permissions) become one-line `GLMError`s naming `dest` (`needed`: bytes, for the
    message). A folder written at the temporary path is moved into place the same way."""
    dest = Path(dest)
    ensure_dir(dest.parent)
    tmp = temp_path(dest)
    _remove_temp(tmp)
    try:
        yield tmp
        if not tmp.exists():
            raise GLMError(f"{dest}: the writer produced no file")
        if tmp.is_dir():
            if dest.is_dir():
                shutil.rmtree(dest)
        else:
            _fsync(tmp)
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)   # MindSpore leaves 0400 files; make them ordinary
        os.replace(tmp, dest)
        _fsync(dest.parent)
    except OSError as e:
        size = needed
        if size is None and tmp.is_file():
            size = tmp.stat().st_size or None
        _remove_temp(tmp)
        raise os_error(e, dest, size) from None
    except BaseException:
        _remove_temp(tmp)
        raise
    _remove_temp(tmp)   # MindSpore's inner .tmp, if it left one


@contextmanager
def atomic_write(dest: PathLike, mode: str = "w", encoding: str = "utf-8",
                 needed: Optional[int] = None) -> Iterator[IO[Any]]:
    """`with atomic_write(path) as f: f.write(...)`: `path` appears complete or not at all."""
    with atomic_path(dest, needed) as tmp:
        with open(tmp, mode, encoding=None if "b" in mode else encoding) as f:
            yield f


def write_bytes_atomic(path: PathLike, data: bytes) -> Path:
    with atomic_path(path, len(data)) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text_atomic(path: PathLike, text: str) -> Path:
    return write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(obj: Any, path: PathLike, indent: Optional[int] = 2) -> Path:
    """`obj` as JSON (UTF-8, not ASCII-escaped, trailing newline), atomically."""
    return write_text_atomic(path, json.dumps(obj, indent=indent, ensure_ascii=False, default=str) + "\n")


def write_jsonl_atomic(rows: list, path: PathLike) -> Path:
    return write_text_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


# ---------------------------------------------------------------------------------------- dead writers
def pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:   # exists, owned by someone else
        return True
    return True


def _stale(name: str, host: str) -> bool:
    m = _TEMP.match(name)
    if m:
        if m["host"] is not None and m["host"] != host:
            return False   # another machine's writer on a shared disk: not ours to judge
        return not pid_alive(int(m["pid"]))
    m = _EXPORT_STAGE.match(name)
    return bool(m) and not pid_alive(int(m["pid"]))


def remove_stale_temps(folder: PathLike, depth: int = 3) -> list[Path]:
    """Delete temporary files (and stage folders) under `folder` (down to `depth` levels) whose writer
    was a process of this host that no longer exists; return what was removed. Live writers' files and
    other hosts' files are left alone."""
    root = Path(folder)
    host = socket.gethostname()
    removed: list[Path] = []

    def walk(d: Path, level: int) -> None:
        try:
            entries = list(os.scandir(d))
        except OSError:
            return
        for entry in entries:
            if entry.name.startswith(".") and _stale(entry.name, host):
                path = Path(entry.path)
                try:
                    if entry.is_dir(follow_symlinks=False):
                        shutil.rmtree(path)
                    else:
                        path.unlink()
                except FileNotFoundError:
                    continue
                except OSError:
                    continue   # read-only: reported when this run tries to write
                removed.append(path)
            elif level < depth and entry.is_dir(follow_symlinks=False) and not entry.name.startswith("."):
                walk(Path(entry.path), level + 1)

    if root.is_dir():
        walk(root, 1)
    return removed


# ---------------------------------------------------------------------------------------- output lock
_held: dict[str, list] = {}   # resolved lock path -> [fd, count]: re-entrant within one process


def _holder(text: str) -> dict:
    try:
        info = json.loads(text)
        return info if isinstance(info, dict) else {}
    except ValueError:
        return {}


def describe_holder(info: dict) -> str:
    started = info.get("started")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if isinstance(started, (int, float)) else "?"
    what = f", {info['what']}" if info.get("what") else ""
    return f"pid {info.get('pid', '?')} on {info.get('host', '?')}, started {when}{what}"


def acquire_output_lock(output_dir: PathLike, what: str = "") -> Path:
    """Take `<output_dir>/.glm-launcher.lock` for this process (re-entrant). A live holder -> GLMError naming
    it; a holder that is gone (killed, crashed) -> taken over with a notice on stderr. Creates
    `output_dir`, so an unusable folder (a file, read-only, no permission) fails here, before any work."""
    d = ensure_dir(output_dir)
    path = d / LOCK_NAME
    key = str(path.resolve())
    if key in _held:
        _held[key][1] += 1
        return path
    host = socket.gethostname()
    for _ in range(20):   # retry when the file is replaced under us (a holder releasing)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise os_error(e, path) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            info = _holder(os.pread(fd, 4096, 0).decode("utf-8", "replace"))
            os.close(fd)
            raise GLMError(f"output_dir {d} is in use by another run ({describe_holder(info)}); wait for it to "
                           "finish or set another --output_dir") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if not same:   # the holder removed the file after we opened it: try again on the new one
            os.close(fd)
            continue
        info = _holder(os.pread(fd, 4096, 0).decode("utf-8", "replace"))
        if info and info.get("host") not in (None, host):
            os.close(fd)   # flock does not reach across machines: a lock from another host is trusted
            raise GLMError(f"output_dir {d} is in use by another run ({describe_holder(info)}); if that run is "
                           f"gone, delete {path}")
        if info:
            state = "no longer running" if not pid_alive(int(info.get("pid", 0) or 0)) else "not holding it"
            print(f"warning: took over the lock of {d} left by an earlier run ({describe_holder(info)}; "
                  f"{state})", file=sys.stderr, flush=True)
        body = json.dumps({"host": host, "pid": os.getpid(), "started": time.time(), "what": what,
                           "argv": sys.argv}).encode()
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, body, 0)
            os.fsync(fd)
        except OSError as e:
            os.close(fd)
            raise os_error(e, path) from None
        _held[key] = [fd, 1]
        return path
    raise GLMError(f"output_dir {d}: could not take {path} (it keeps changing); is another run starting?")


def release_output_lock(output_dir: PathLike) -> None:
    path = Path(output_dir) / LOCK_NAME
    try:
        key = str(path.resolve())
    except OSError:
        return
    entry = _held.get(key)
    if entry is None:
        return
    entry[1] -= 1
    if entry[1] > 0:
        return
    del _held[key]
    try:
        path.unlink()   # while still holding the flock: a waiting opener retries on the new file
    except OSError:
        pass
    os.close(entry[0])


@contextmanager
def output_lock(output_dir: PathLike, what: str = "", enabled: bool = True) -> Iterator[Optional[Path]]:
    """Hold the output folder's lock for the block, then remove dead writers' temporary files in it.
    `enabled=False` (ranks other than 0 of a distributed job: the lock covers the job) does nothing."""
    if not enabled:
        yield None
        return
    path = acquire_output_lock(output_dir, what)
    try:
        for f in remove_stale_temps(output_dir):
            print(f"removed {f}: a temporary file left by a killed run", flush=True)
        yield path
    finally:
        release_output_lock(output_dir)
