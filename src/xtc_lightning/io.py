"""Atomic file and folder writes: a reader sees the old content or the new one, never a part.

Every file the project writes for another process (results, caches, exports, reports) goes
through here. A file is written under a temporary name in the same folder
(``.<name>.tmp<pid><suffix>``: the same filesystem, so the rename is atomic) and renamed over
the final name with ``os.replace``; if writing raises, the temporary file is removed, the
exception propagates and the final name keeps its old content (or stays absent). A folder is
written whole as ``.<name>.tmp<pid>`` and then swapped in.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path


def temp_name(path: Path, suffix: str = "") -> Path:
    """The temporary sibling of ``path`` this process writes: ``.<name>.tmp<pid><suffix>``."""
    return path.with_name(f".{path.name}.tmp{os.getpid()}{suffix}")


@contextmanager
def atomic_path(path: str | Path, suffix: str = "") -> Iterator[Path]:
    """Yield the temporary sibling of ``path`` (``suffix`` appended, for writers that need an
    extension, e.g. ``.npz``); on a normal exit it is renamed onto ``path``, on an exception it
    is removed and ``path`` is left as it was. The parent folder is created if needed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(path, suffix)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically (``atomic_path``)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def replace_folder(new: Path, target: Path) -> None:
    """Move the folder ``new`` to ``target``; an existing ``target`` is first renamed aside
    (``.<name>.old<pid>``), then deleted once ``new`` is in place."""
    old = target.with_name(f".{target.name}.old{os.getpid()}")
    if target.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
    os.replace(new, target)
    shutil.rmtree(old, ignore_errors=True)


@contextmanager
def atomic_folder(folder: str | Path, keep_existing: bool = False) -> Iterator[Path]:
    """Yield a fresh, empty temporary folder beside ``folder`` (a leftover one is deleted first);
    on a normal exit it becomes ``folder``: replacing an existing one (``replace_folder``), or,
    with ``keep_existing``, only if ``folder`` is absent or empty (a non-empty ``folder``, e.g.
    published meanwhile by a concurrent run, wins and the new content is dropped). On an
    exception, or when dropped, the temporary folder is deleted and ``folder`` is untouched."""
    folder = Path(folder)
    tmp = temp_name(folder)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        if not keep_existing:
            replace_folder(tmp, folder)
        else:
            with suppress(OSError):  # a non-empty folder is already there: keep it
                os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
