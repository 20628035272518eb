"""Where an output directory may go, and the debris a killed writer leaves next to it.

`AtomicDirectory` (in `writers`) builds DST in a hidden sibling `.DST.tmp-<owner>-<random>` and, when replacing
an existing DST, first moves it into `.DST.old-<owner>-<random>/previous`. `<owner>` is `host-pid-start`: the
writing process's host name, pid and start time (centiseconds since the epoch, from psutil), so that a later
run can tell a dead writer's leftovers from a live one's even after the pid has been reused. A process killed
with SIGKILL (the out-of-memory killer) cannot remove them; `clean_stale(dst)` does, on the next write to DST.

Before anything is written, `check_location` refuses `/`, the home directory and the current directory (or a
directory holding one of them), and `check_replaceable` refuses `--overwrite` of a directory this tool did not
write.
"""
from __future__ import annotations

import os
import re
import shutil
import socket
from typing import List, Optional, Sequence, Tuple

import psutil

from ms_xcomposer.conversion import layout
from ms_xcomposer.conversion.errors import DestinationExistsError, UnsafeDestinationError

# Files that show a directory was written by this tool (convert writes both, export-hf the report).
OUTPUT_MARKERS = (layout.REPORT, layout.MS_INDEX)
ASIDE = "previous"  # the replaced DST inside a `.DST.old-*` directory
_START_SLACK = 100  # centiseconds: start times read twice from /proc may differ by rounding


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname())[:64] or "localhost"


def _start_time(proc: psutil.Process) -> int:
    return int(round(proc.create_time() * 100))


def temp_prefix(dst: str, kind: str) -> str:
    """`.DST.<kind>-<host>-<pid>-<start>-` for `tempfile.mkdtemp(prefix=...)`; kind is "tmp" or "old"."""
    return f".{os.path.basename(dst)}.{kind}-{_host()}-{os.getpid()}-{_start_time(psutil.Process())}-"


def _parse_owner(dst: str, name: str) -> Optional[Tuple[str, str, int, int]]:
    """(kind, host, pid, start) of a sibling `name` that a writer of `dst` made, else None."""
    prefix = f".{os.path.basename(dst)}."
    if not name.startswith(prefix):
        return None
    # mkdtemp's random suffix and the sanitised host name hold no "-", so the split is unambiguous
    m = re.fullmatch(r"(tmp|old)-([A-Za-z0-9_.]+)-(\d+)-(\d+)-[a-z0-9_]+", name[len(prefix):])
    return None if m is None else (m.group(1), m.group(2), int(m.group(3)), int(m.group(4)))


def _alive(pid: int, start: int) -> bool:
    """Whether process `pid` still runs and is the one that started at `start` (not a reused pid)."""
    try:
        proc = psutil.Process(pid)
        return proc.status() != psutil.STATUS_ZOMBIE and abs(_start_time(proc) - start) <= _START_SLACK
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:  # cannot tell: assume it is running
        return True


def _size(path: str) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(root, f)).st_size
            except OSError:
                pass
    return total


def clean_stale(dst: str) -> List[str]:
    """Remove the temporary siblings of `dst` left by writers that no longer run; returns one message each.

    A `.DST.old-*` directory still holding the previous DST while DST itself is missing means the writer died
    between moving DST aside and putting the new one in place: the previous DST is moved back (the new output
    may be incomplete, so it is not trusted). Leftovers of live processes, or of another host (whose processes
    cannot be checked from here), are left alone.
    """
    dst = os.path.abspath(dst)
    parent = os.path.dirname(dst)
    try:
        names = sorted(os.listdir(parent))
    except OSError:  # no parent yet: nothing left behind
        return []
    found = [(n, o) for n in names
             if (o := _parse_owner(dst, n)) is not None and os.path.isdir(os.path.join(parent, n))]
    messages = []
    host = _host()
    # old-* first: a restored DST must be in place before anything else looks at it
    for name, (kind, owner_host, pid, start) in sorted(found, key=lambda f: f[1][0] != "old"):
        path = os.path.join(parent, name)
        if owner_host != host:
            messages.append(f"left {path} alone: written on host {owner_host}, whose processes cannot be checked "
                            "from here; remove it once no conversion runs there")
            continue
        if _alive(pid, start):
            continue
        aside = os.path.join(path, ASIDE)
        if kind == "old" and os.path.isdir(aside) and not os.path.lexists(dst):
            os.rename(aside, dst)
            messages.append(f"restored {dst} from {path}: the process (pid {pid}) replacing it was killed")
        size = _size(path)
        shutil.rmtree(path, ignore_errors=True)
        what = "temporary output" if kind == "tmp" else "replaced output"
        done = "could not remove" if os.path.lexists(path) else "removed"  # e.g. no permission: say so
        messages.append(f"{done} stale {what} {path} ({size / 1e9:.2f} GB) of a process that no longer runs "
                        f"(pid {pid})")
    return messages


def _contains(outer: str, inner: str) -> bool:
    return inner == outer or inner.startswith(outer.rstrip(os.sep) + os.sep)


def check_location(dst: str) -> None:
    """Refuse `/`, the home and the current directory, and directories holding one of them, as an output
    directory (symlinks and relative paths resolved first)."""
    real = os.path.realpath(dst)
    if real == os.path.realpath(os.sep):
        raise UnsafeDestinationError(f"destination {dst} is the root directory; choose a new directory")
    for what, path in (("the home directory", os.path.expanduser("~")), ("the current directory", os.getcwd())):
        path = os.path.realpath(path)
        if _contains(real, path):
            holds = "is" if real == path else "holds"
            raise UnsafeDestinationError(f"destination {dst} {holds} {what} ({path}); choose a new directory")


def check_replaceable(dst: str, overwrite: bool, markers: Sequence[str] = OUTPUT_MARKERS) -> None:
    """Raise unless `dst` is absent or, with `overwrite`, an empty directory or one holding one of `markers`
    (a file this tool writes)."""
    if not os.path.lexists(dst):
        return
    if not overwrite:
        raise DestinationExistsError(f"destination {dst} already exists; pass --overwrite to replace it")
    real = os.path.realpath(dst)
    if not os.path.isdir(real):
        raise UnsafeDestinationError(f"destination {dst} is not a directory; --overwrite replaces only a directory "
                                     "this tool wrote")
    entries = os.listdir(real)
    if entries and not any(m in entries for m in markers):
        raise UnsafeDestinationError(
            f"destination {dst} was not written by ms-xcomposer: it is not empty and "
            f"holds no {' or '.join(markers)}; --overwrite replaces only such a directory (or an empty one): "
            "remove it yourself or choose another")
