"""Atomic writes: a file or a folder appears whole under its final name, or not at all.

Files are written to a temporary name beside the target and renamed. A folder is built under
`<name>.partial` (which may hold resumable work, e.g. per-layer checkpoints) and renamed when complete.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

PARTIAL_SUFFIX = ".partial"


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write to a temporary file beside `path`, then rename: never leaves a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; results and docs are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def partial_folder(out: str | Path) -> Path:
    """The work folder `<out>.partial` in which `out` is built before `commit_folder` renames it."""
    out = Path(out)
    return out.with_name(out.name + PARTIAL_SUFFIX)


def discard_partial(out: str | Path) -> None:
    """Start over: remove the work folder of `out` (and what it held)."""
    work = partial_folder(out)
    if work.exists():
        shutil.rmtree(work)


def commit_folder(out: str | Path) -> Path:
    """Rename the finished work folder to `out`, replacing a previous `out` (or an empty folder there)."""
    out = Path(out)
    work = partial_folder(out)
    if out.is_dir() and any(out.iterdir()):
        shutil.rmtree(out)
    elif out.exists():
        out.rmdir()
    work.rename(out)
    return out
