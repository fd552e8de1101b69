"""Directories that appear whole or not at all, and never over an existing one unasked.

A run (``swapvae train``) or a bundle (``swapvae export``) is written into a staging directory
beside its destination and moved into place by a rename once it is complete, so a crash, a
Ctrl-C or a failed check never leaves half of one where a reader looks, and never touches what
was there. An existing destination is refused unless ``force``; with ``force`` it is replaced
only once the new one is complete.

A run's staging directory has a fixed name (``.NAME.partial`` beside it) and is kept when
training stops early, so its last checkpoint is not lost; the next training into the same
destination starts it afresh, unless it resumes it (``swapvae train --resume``). A bundle's is
temporary and removed on failure.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def refuse_existing(out: Path, force: bool, what: str) -> None:
    """ValueError when ``out`` exists (anything but an empty directory) and ``force`` is off."""
    if force or not os.path.lexists(out) or (out.is_dir() and not out.is_symlink() and not any(out.iterdir())):
        return
    raise ValueError(f"{out} exists: refusing to overwrite a {what} (--force replaces it once the new one is "
                     f"complete; or choose another --out)")


def partial_dir(out: Path) -> Path:
    """Where a run being trained into ``out`` is written until it is complete."""
    return out.parent / f".{out.name}.partial"


@contextmanager
def staged(out: str | Path, *, force: bool, what: str, keep_partial: bool = False,
           resume: bool = False) -> Iterator[Path]:
    """A staging directory for ``out``, moved into place when the block ends without an error.
    ``keep_partial``: the run's fixed ``partial_dir``, kept if the block fails (else a temporary
    directory, removed); ``resume``: that one as a run that stopped early left it. Readable by
    others as a plain ``mkdir`` would make it."""
    out = Path(out)
    refuse_existing(out, force, what)
    out.parent.mkdir(parents=True, exist_ok=True)
    if resume:
        stage = partial_dir(out)
    elif keep_partial:
        stage = partial_dir(out)
        if stage.exists():  # a run into the same place that stopped early: start afresh
            shutil.rmtree(stage)
        stage.mkdir()
    else:
        stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(stage, 0o777 & ~umask)  # mkdtemp makes it private
    try:
        yield stage
        refuse_existing(out, force, what)  # still true at the end: something may have appeared meanwhile
        replace_dir(stage, out)
    except BaseException:
        if not (keep_partial or resume):
            shutil.rmtree(stage, ignore_errors=True)
        raise


def replace_dir(new: Path, out: Path) -> None:
    """Move the directory ``new`` to ``out``, replacing whatever is there only after ``new`` is
    in place under a name of its own (the old one is then removed)."""
    if not os.path.lexists(out) or (out.is_dir() and not out.is_symlink() and not any(out.iterdir())):
        os.replace(new, out)
        return
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    os.rename(out, old)
    try:
        os.rename(new, out)
    except BaseException:
        os.rename(old, out)
        raise
    if old.is_dir() and not old.is_symlink():
        shutil.rmtree(old, ignore_errors=True)
    else:
        old.unlink()
