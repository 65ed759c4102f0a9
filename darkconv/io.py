"""Writing outputs safely: one home for atomic writes, output-path checks and temp files.

* :func:`atomic_write` writes to a temp file in the destination folder (named
  ``.NAME.darkconv-tmp-HOST-PID-RANDOM``, so that it is recognisably darkconv's), fsyncs it
  and renames it over the destination: an interrupted or failed command never leaves a
  half-written output, and an existing output stays intact until the new one is complete.
* Only a new path or an existing regular file is ever written: a symlink, directory,
  device node (``-o /dev/null``), FIFO or socket is refused with one line, never replaced.
* :func:`check_output_path` / :func:`prepare_output_dir` do these checks (and a write probe
  in the folder) *before* expensive work, so a command fails in milliseconds, not after a
  full load and export.
* :func:`sha256_file` is the one file hash (cache checks, sidecars, provenance in reports).
* Temp files left by a killed process (SIGKILL, power loss) are removed by the next write
  into the same folder, once their process is gone; a SIGTERM/SIGINT'd darkconv removes its
  own (the CLI turns both into a clean exit).
"""
from __future__ import annotations

import atexit
import hashlib
import os
import re
import secrets
import socket
import stat
from pathlib import Path

from .errors import DarkconvError

TEMP_MARK = ".darkconv-tmp-"
_HOST = re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname() or "host")[:40]
_TEMP_RE = re.compile(r"^\..*" + re.escape(TEMP_MARK) + r"(?P<host>[A-Za-z0-9._]+)-(?P<pid>\d+)-[0-9a-f]+$")
_LIVE: set[str] = set()       # temp files this process is writing now (removed at exit if still there)
_CLEANED: set[str] = set()    # folders already swept for stale temp files


def temp_path(path: str | Path) -> Path:
    """A fresh temp-file path beside ``path``: ``.NAME.darkconv-tmp-HOST-PID-RANDOM``."""
    p = Path(path)
    name = p.name if len(p.name.encode()) <= 150 else p.name[:100]  # stay below NAME_MAX
    return p.parent / f".{name}{TEMP_MARK}{_HOST}-{os.getpid()}-{secrets.token_hex(4)}"


def _kind(mode: int) -> str | None:
    """What a non-regular file is, in words (None for a regular file)."""
    for test, what in ((stat.S_ISLNK, "a symbolic link"), (stat.S_ISDIR, "a directory"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return what
    return None if stat.S_ISREG(mode) else "not a regular file"


def _refuse_special(p: Path) -> None:
    try:
        st = os.lstat(p)
    except FileNotFoundError:
        return
    except OSError as e:
        raise DarkconvError(f"cannot check the output path: {e.strerror}", file=str(p)) from None
    what = _kind(st.st_mode)
    if what:
        raise DarkconvError(f"is {what}: darkconv writes only to a new path or over a regular file "
                            "(it would replace it, not write into it); give another output path", file=str(p))


def _probe(folder: Path, target: Path) -> None:
    """Create and remove a temp file in ``folder``: the one reliable writability test (root, ACLs, ro mounts)."""
    tmp = temp_path(target)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as e:
        raise DarkconvError(f"cannot write in the folder {folder}: {e.strerror}", file=str(target)) from None
    os.close(fd)
    os.unlink(tmp)


def check_output_path(path: str | Path, *, probe: bool = True) -> Path:
    """``path`` if darkconv may write it: a new path or a regular file, in an existing folder where a
    file can be created (with ``probe``). Otherwise a one-line :class:`DarkconvError`."""
    p = Path(path)
    _refuse_special(p)
    folder = p.parent
    if not folder.is_dir():
        raise DarkconvError(f"the folder {folder} does not exist" if not folder.exists() else
                            f"{folder} is not a folder", file=str(p))
    if probe:
        _probe(folder, p)
    return p


def prepare_output_dir(path: str | Path) -> Path:
    """Create the output folder ``path`` (and its parents) if needed and check that files can be
    written in it; a one-line :class:`DarkconvError` otherwise (e.g. under a read-only folder)."""
    p = Path(path)
    try:
        st = os.lstat(p)
    except FileNotFoundError:
        st = None
    except OSError as e:
        raise DarkconvError(f"cannot use the output folder: {e.strerror}", file=str(p)) from None
    if st is not None and not stat.S_ISDIR(st.st_mode):
        what = _kind(st.st_mode) or "a file"
        if not (stat.S_ISLNK(st.st_mode) and p.is_dir()):  # a symlink to a folder is a folder
            raise DarkconvError(f"is {what}, not a folder: give a folder for the output", file=str(p))
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DarkconvError(f"cannot create the output folder: {e.strerror}", file=str(p)) from None
    _probe(p, p / "probe")
    return p


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: someone else's process
        return True
    return True


def clean_stale_temps(folder: str | Path) -> list[Path]:
    """Remove darkconv temp files in ``folder`` whose process (on this host) is gone; returns them.
    Each folder is swept once per process."""
    folder = Path(folder)
    key = os.path.abspath(folder)
    if key in _CLEANED:
        return []
    _CLEANED.add(key)
    removed = []
    try:
        names = [n for n in os.listdir(folder) if TEMP_MARK in n and n.startswith(".")]
    except OSError:
        return removed
    for n in names:
        m = _TEMP_RE.match(n)
        if not m or m["host"] != _HOST or int(m["pid"]) == os.getpid() or _pid_alive(int(m["pid"])):
            continue
        try:
            os.unlink(folder / n)
            removed.append(folder / n)
        except OSError:
            pass
    return removed


def atomic_write(path: str | Path, chunks) -> None:
    """Write bytes ``chunks`` to a temp file beside ``path``, fsync, and rename it into place.

    ``path`` must be a new path or a regular file (a symlink, device, FIFO, socket or folder is
    refused). On any failure the temp file is removed and an existing ``path`` is left unchanged.
    """
    path = Path(path)
    check_output_path(path, probe=False)
    folder = path.parent
    clean_stale_temps(folder)
    tmp = temp_path(path)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies, as for any file
    except OSError as e:
        raise DarkconvError(f"cannot write here: {e.strerror}", file=str(path)) from None
    _LIVE.add(str(tmp))
    try:
        with os.fdopen(fd, "wb") as f:
            for c in chunks:
                f.write(c)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(folder)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(e, OSError):
            raise DarkconvError(f"cannot write: {e.strerror}", file=str(path)) from None
        raise
    finally:
        _LIVE.discard(str(tmp))


def sha256_file(path: str | Path | None) -> str | None:
    """Hex sha256 of a file's bytes, read in 1 MiB chunks; None for ``None`` or a path that is not a file."""
    if path is None or not Path(path).is_file():
        return None
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(folder: Path) -> None:
    """Make the rename durable (best effort: not every file system lets a folder be fsynced)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@atexit.register
def _remove_live_temps() -> None:
    """A temp file still being written at exit (e.g. by a worker thread) is removed."""
    for t in list(_LIVE):
        try:
            os.unlink(t)
        except OSError:
            pass
