"""Whether memory and disk will do, checked before long work writes anything: what this process can
still take, and one line naming what is short when it is not."""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from pathlib import Path

from featinv.errors import FeatInvError

GB = 1e9


def available_memory() -> int | None:
    """Bytes of memory this process can still take: Linux's ``MemAvailable``, lowered to what its
    cgroup's limit leaves where one is set (a container); None where neither can be read."""
    found = []
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    found.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            used = int(Path("/sys/fs/cgroup/memory.current").read_text())
            found.append(max(0, int(limit) - used))
    except (OSError, ValueError):
        pass
    return min(found) if found else None


def existing_folder(path: str | Path) -> Path:
    """``path`` itself or its nearest ancestor that exists (where a new output will be made)."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def free_disk(path: str | Path) -> int:
    """Free bytes on the file system that holds ``path`` (or would hold it)."""
    return shutil.disk_usage(existing_folder(path)).free


def require_memory(needed: int, what: str) -> None:
    """Raise FeatInvError when ``needed`` bytes are more than :func:`available_memory`."""
    available = available_memory()
    if available is not None and needed > available:
        raise FeatInvError(
            f"{what} needs about {needed / GB:.1f} GB of memory, but {available / GB:.1f} GB are available: "
            "close other programs, or run it on a machine with more memory"
        )


def require_disk(outputs: Sequence[tuple[str, str | Path, int]], hint: str = "") -> None:
    """Raise FeatInvError when ``outputs`` (what, path, bytes) will not fit on their file systems;
    outputs on one file system add up. ``hint`` ends the message (another place to write to)."""
    by_device: dict[int, list] = {}
    for what, path, size in outputs:
        folder = existing_folder(path)
        entry = by_device.setdefault(os.stat(folder).st_dev, [folder, 0, []])
        entry[1] += size
        entry[2].append(f"{what} ({size / GB:.1f} GB)")
    for folder, size, whats in by_device.values():
        free = free_disk(folder)
        if size > free:
            raise FeatInvError(
                f"{' and '.join(whats)} need {size / GB:.1f} GB of disk, but the file system of {folder} has "
                f"{free / GB:.1f} GB free: free space there{hint}"
            )
