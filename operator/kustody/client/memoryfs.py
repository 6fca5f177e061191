"""Is a directory memory-backed? Read from /proc/self/mountinfo (no statfs in Python's os)."""

from __future__ import annotations

import os
from pathlib import Path

MEMORY_FILESYSTEMS = frozenset({"tmpfs", "ramfs"})
MOUNTINFO = Path("/proc/self/mountinfo")


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo (octal).
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def filesystem_type(path: str, mountinfo: str) -> str | None:
    """The type of the filesystem ``path`` (absolute, symlinks resolved) is on: the last-
    mounted entry with the longest mount point that contains it. None if nothing matches."""
    best: tuple[int, str] | None = None
    for line in mountinfo.splitlines():
        left, sep, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if not sep or len(fields) < 5 or not tail:
            continue
        mount_point = _unescape(fields[4])
        inside = path == mount_point or path.startswith(mount_point.rstrip("/") + "/")
        # A later line with an equal mount point is mounted over the earlier one: ">=".
        if inside and (best is None or len(mount_point) >= best[0]):
            best = (len(mount_point), tail[0])
    return best[1] if best else None


def is_memory_backed(directory: str | Path, mountinfo: Path = MOUNTINFO) -> bool:
    """True when ``directory`` is on tmpfs or ramfs (e.g. an ``emptyDir`` with
    ``medium: Memory`` or /dev/shm). Unknown (no /proc) counts as not memory-backed.
    Symlinks in ``directory`` are resolved: the answer is about where it really is — so the
    caller must write *there*, not through a link (``kustody unwrap --out`` does)."""
    try:
        text = mountinfo.read_text()
    except OSError:
        return False
    kind = filesystem_type(os.path.realpath(directory), text)
    return kind in MEMORY_FILESYSTEMS
