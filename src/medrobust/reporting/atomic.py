"""Files that are whole or absent: a run stopped mid-write (SIGINT, SIGTERM, ``kill -9``) leaves the previous file.

Every writer of a run's files goes through :func:`atomic_path`: it writes a temporary file in the target's folder
(same file system, so the rename is atomic), flushes it to disk and renames it over the target with
:func:`os.replace`. A failure before the rename (an exception while serialising, a kill) leaves the target as it
was and removes the temporary file where the process lives to do so.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path to write ``path``'s new content to; on leaving the block it replaces ``path``.

    The temporary name keeps ``path``'s extension (``.summary.md.<pid>.tmp.md``), so writers that infer a format
    from it (``savefig``) still do; it starts with a dot, so globbing ``*.png`` does not list it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp{path.suffix}")
    try:
        yield tmp
        with open(tmp, "rb+") as handle:  # on disk before the rename, so a crash cannot leave an empty target
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically; returns ``path``."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def save_figure_atomic(fig, path: str | Path, **savefig_kwargs) -> Path:
    """``fig.savefig`` to ``path`` atomically (the format from ``path``'s extension); returns ``path``."""
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=path.suffix.lstrip(".") or None, **savefig_kwargs)
    return path
