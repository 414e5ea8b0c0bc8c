"""Atomic file writes: every file oes_fast writes (masks, checkpoints, images, plots, reports)
goes through `atomic_path`, so an interrupted write never leaves a half-written file where the
last good one was."""
from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager


@contextmanager
def atomic_path(path, suffix: str = ""):
    """Yield a temporary path in the folder of `path` (created if missing) to write to; when the
    block succeeds it is renamed onto `path` with the usual 0666 & ~umask permissions, when it
    fails it is removed and `path` is left as it was. `suffix` keeps an extension for writers
    that read it (matplotlib)."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    # "<name>.tmp-XXXX": torch.save refuses names starting with a dot
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".tmp-", suffix=suffix, dir=folder)
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_text(path, text: str) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        f.write(text)


def _umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it; put it straight back
    os.umask(mask)
    return mask
