"""Filesystem checks shared by every stage that writes (checkpoints, caches, results, CLI).

Kept free of torch and of every other part of the package, so that any stage (and the
command line, before it loads anything heavy) can check an output folder first.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import uuid
from pathlib import Path

logger = logging.getLogger(__name__)

__all__ = ["MIN_FREE_BYTES", "check_writable"]


MIN_FREE_BYTES = 16 * 2**20
"""Free space :func:`check_writable` asks for by default (16 MiB: cells, logs, small models)."""


def check_writable(path: str | os.PathLike[str], min_free_bytes: int = MIN_FREE_BYTES) -> Path:
    """Make sure ``path`` is a folder this process can write to, before long work starts.

    Creates the folder (and its parents), writes, reads back and removes a small probe file,
    and checks that its filesystem has at least ``min_free_bytes`` free.

    Parameters
    ----------
    path
        Output folder (created when missing).
    min_free_bytes
        Free space required on the folder's filesystem, in bytes (0: no check).

    Returns
    -------
    Path
        The folder.

    Raises
    ------
    NotADirectoryError
        ``path``, or one of its parents, is a regular file.
    PermissionError
        The folder cannot be created or written to.
    OSError
        Any other failure (read-only filesystem, disk full: ``errno.ENOSPC``); the message
        names the folder and what is wrong.
    """
    folder = Path(path).expanduser()

    def fail(exc: OSError, what: str) -> OSError:
        code = exc.errno if exc.errno is not None else errno.EIO
        reason = exc.strerror or str(exc)
        where = f" ({exc.filename})" if exc.filename and str(exc.filename) != str(folder) else ""
        return type(exc)(
            code,
            f"output folder {folder} is not usable: {what} failed: {reason}{where}. "
            "Choose another output folder, or fix its permissions / free space",
        )

    try:
        folder.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as exc:
        blocker = next((p for p in (folder, *folder.parents) if p.is_file()), folder)
        raise NotADirectoryError(
            errno.ENOTDIR,
            f"output folder {folder} is not usable: {blocker} is a file, not a folder. "
            "Choose another output folder",
        ) from exc
    except OSError as exc:
        raise fail(exc, "creating the folder") from exc
    if not folder.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, f"output folder {folder} is not a folder")
    probe = folder / f".write-probe-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    payload = b"matbench-dim write probe\n"
    try:
        with open(probe, "wb") as fh:
            fh.write(payload)
            fh.flush()
            os.fsync(fh.fileno())
        if probe.read_bytes() != payload:
            raise OSError(errno.EIO, "the probe file read back differently")
    except OSError as exc:
        raise fail(exc, "writing a probe file") from exc
    finally:
        try:
            probe.unlink(missing_ok=True)
        except OSError:
            logger.warning("could not remove the probe file %s", probe)
    if min_free_bytes > 0:
        free = shutil.disk_usage(folder).free
        if free < min_free_bytes:
            raise OSError(
                errno.ENOSPC,
                f"output folder {folder} is not usable: only {free / 2**20:.1f} MiB free on its "
                f"filesystem, {min_free_bytes / 2**20:.1f} MiB needed. Free some space or "
                "choose another output folder",
            )
    return folder
