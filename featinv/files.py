"""File modes for what featinv writes: files staged in temporary folders (``mkdtemp`` is 0700,
``mkstemp`` 0600) get the modes any other file would, 0666/0777 less the process's umask, so that
model folders, outputs and checkpoints are readable by others as usual."""

from __future__ import annotations

import json
import os
import stat
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


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write a text file atomically: a temporary file in the same folder, then a rename (a crash
    leaves the old file or the new one, never half of one)."""
    import tempfile

    path = Path(path)
    handle, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "w") as file:
            file.write(text)
        publish(temp_name)  # mkstemp made it 0600
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise


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
