"""Files written through a temporary in the same folder that replaces them only when complete (a kill never leaves
a truncated file), and the removal of temporaries that killed writers left behind."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import IO

TMP_MARKER = ".tmp-"


def _fsync_folder(folder: str) -> None:
    with contextlib.suppress(OSError, AttributeError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_file(filename: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Write ``filename`` through a temporary file in the same folder that replaces it only when complete."""
    filename = os.fspath(filename)
    tmp = f"{filename}{TMP_MARKER}{os.getpid()}"
    try:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, filename)
    except BaseException:  # including SystemExit from a signal handler: never leave the temporary behind
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    _fsync_folder(os.path.dirname(os.path.abspath(filename)))


def remove_stale_temporaries(folder: str | os.PathLike) -> list[str]:
    """Temporaries left by a process killed while writing (SIGKILL cannot clean up). A temporary whose writer (the
    pid in its name) is still running on this machine is kept: another fold started in parallel may be writing it."""
    removed = []
    for path in Path(folder).glob(f"*{TMP_MARKER}*"):
        if path.is_file() and not _process_alive(path.name.rpartition(TMP_MARKER)[2]):
            with contextlib.suppress(OSError):
                path.unlink()
                removed.append(path.name)
    return removed


def _process_alive(pid: str) -> bool:
    if not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)  # signal 0: only checks that the process exists
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:  # it exists, owned by another user
        return True
    return True
