"""Writing files so that nothing is ever half-written.

A file is written to a temporary name beside it, flushed to disk (fsync) and
renamed over its predecessor (:func:`atomic_write`); the rename is atomic, so
a reader or a crash sees the old file or the new one, never a mix. A folder
is written beside its final place and swapped in (:func:`replaced_folder`).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


def fsync_dir(folder: Path) -> None:
    """Flush a folder's entries (a rename in it) to disk."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    """``write(tmp)`` to a temporary name beside ``path``, fsync it, then rename it over ``path``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda p: p.write_text(text))


@contextmanager
def replaced_folder(final: Path) -> Iterator[Path]:
    """A new, empty folder beside ``final`` to write into. When the block ends without an error, it takes
    ``final``'s place (a previous ``final`` is removed after the swap); when it raises, it is removed and
    ``final`` is left exactly as it was."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    staged = final.with_name(f".{final.name}.new-{os.getpid()}")
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    shutil.rmtree(staged, ignore_errors=True)
    staged.mkdir()
    try:
        yield staged
        for f in staged.rglob("*"):
            if f.is_file():
                fsync_file(f)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    if final.exists():
        os.replace(final, old)
    os.replace(staged, final)
    fsync_dir(final.parent)
    shutil.rmtree(old, ignore_errors=True)
