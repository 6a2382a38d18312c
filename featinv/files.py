"""How featinv writes files, in one place: every file atomically (:func:`atomic_file`: a temporary
sibling, then a rename) and every folder staged (:func:`staged_folder`: a temporary sibling folder,
then a rename or a move of its entries), with one fsync policy: a file's data reaches the disk
before the rename that makes it visible, so a crash leaves the old version or the new one, never
half of one. Files staged in temporary folders (``mkdtemp`` is 0700, ``mkstemp`` 0600) get the modes
any other file would, 0666/0777 less the process's umask, so that model folders, outputs and
checkpoints are readable by others as usual. Also: what is at a path, for messages."""

from __future__ import annotations

import json
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

SPECIAL_FILES = (
    (stat.S_ISFIFO, "a named pipe (FIFO)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def what_is_there(path: str | Path) -> str | None:
    """None for a regular file (links followed); otherwise what a message calls what is at ``path``:
    ``not found``, ``a folder``, ``a named pipe (FIFO)``, ``a character device`` (``/dev/zero``)..."""
    try:
        mode = os.stat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):  # nothing there, or a file where a folder would be
        return "not found"
    except OSError as error:  # a link loop, a name too long, no permission to look
        return f"not readable ({error.strerror or error})"
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISDIR(mode):
        return "a folder"
    return next((name for test, name in SPECIAL_FILES if test(mode)), "a special file")


def require_file(path: str | Path, what: str, hint: str = "") -> Path:
    """``path`` if it is a regular file; otherwise a FeatInvError naming ``what`` and what is there
    (``features file /dev/zero is a character device, not a regular file``); ``hint`` follows a
    missing file's message."""
    from featinv.errors import FeatInvError

    found = what_is_there(path)
    if found == "not found":
        raise FeatInvError(f"{what} {path} not found{hint}")
    if found is not None:
        raise FeatInvError(f"{what} {path} is {found}, not a regular file")
    return Path(path)


def current_umask() -> int:
    """The process's umask (read by setting it and setting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def publish(path: str | Path) -> None:
    """Give ``path`` (a file, or a folder and everything in it) the umask's usual modes."""
    path = Path(path)
    mask = current_umask()
    if path.is_dir():
        for root, dirs, files in os.walk(path):
            os.chmod(root, 0o777 & ~mask)
            for name in dirs:
                os.chmod(os.path.join(root, name), 0o777 & ~mask)
            for name in files:
                os.chmod(os.path.join(root, name), 0o666 & ~mask)
    elif path.exists():
        os.chmod(path, 0o666 & ~mask)


def _fsync(path: Path) -> None:
    with path.open("rb") as handle:
        os.fsync(handle.fileno())


@contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """A temporary path beside ``path`` for the block to write; when the block succeeds the file is
    synced to disk, given the usual mode and renamed onto ``path``; otherwise it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    temp = Path(name)
    try:
        yield temp
        _fsync(temp)
        publish(temp)  # mkstemp made it 0600
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write a text file atomically (:func:`atomic_file`)."""
    with atomic_file(path) as temp:
        temp.write_text(text, encoding="utf-8")


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    """Write a binary file atomically (:func:`atomic_file`)."""
    with atomic_file(path) as temp:
        temp.write_bytes(data)


@contextmanager
def staged_folder(target: str | Path, *, merge: bool = False, last: str | None = None) -> Iterator[Path]:
    """A temporary sibling folder of ``target`` for the block to write into. When the block succeeds
    its files are synced to disk and given the usual modes, then either the folder replaces
    ``target`` whole (an existing one is swapped out and removed only afterwards), or with
    ``merge`` its entries move into ``target`` (a command's outputs into an existing folder;
    ``last``: the entry moved last, e.g. a manifest whose presence marks a complete set, removed
    first). When the block fails the staging folder is removed and ``target`` is untouched."""
    from featinv.errors import FeatInvError

    target = Path(target)
    if merge and target.exists() and not target.is_dir():
        raise FeatInvError(f"cannot write into {target}: it exists and is not a folder")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        yield staging
        for file in (p for p in staging.rglob("*") if p.is_file()):  # on disk before they become visible
            _fsync(file)
        publish(staging)  # mkdtemp made it 0700
        if merge:
            target.mkdir(parents=True, exist_ok=True)
            if last is not None:
                (target / last).unlink(missing_ok=True)
            for item in sorted(staging.iterdir(), key=lambda item: item.name == last):
                _replace(item, target / item.name)
        else:
            _replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _replace(source: Path, target: Path) -> None:
    """Move ``source`` onto ``target``; an existing folder there is swapped out and removed only
    afterwards (so a failed move leaves it in place)."""
    if not target.is_dir() or target.is_symlink():
        os.replace(source, target)
        return
    backup = target.with_name(f".{target.name}.old-{os.getpid()}")
    os.replace(target, backup)
    try:
        os.replace(source, target)
    except BaseException:
        os.replace(backup, target)
        raise
    shutil.rmtree(backup, ignore_errors=True)


def probe_writable(folder: str | Path) -> None:
    """Create ``folder`` (and its parents) and make and remove a probe folder in it: an OSError
    when outputs could not be staged there."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    Path(tempfile.mkdtemp(prefix=".probe.", dir=folder)).rmdir()


def read_json_object(file: str | Path) -> dict[str, Any]:
    """A JSON file that must hold an object (a config); FeatInvError naming the file otherwise."""
    from featinv.errors import FeatInvError

    file = Path(file)
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise FeatInvError(f"{file} is not valid JSON ({error})") from error
    if not isinstance(data, dict):
        raise FeatInvError(f"{file} must hold a JSON object, got {type(data).__name__}")
    return data
