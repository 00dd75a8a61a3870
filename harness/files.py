"""Files and folders colleagues can read: the modes the user's umask allows (results and caches shared on a
lab server).

``tempfile.mkdtemp`` and ``mkstemp`` create 0700 folders and 0600 files whatever the umask, so a run folder,
a decoded-image cache or a verified-images record written through them and then renamed into place would be
private even where the umask (022, 002) shares everything else. ``as_umask_allows`` gives such a path the mode
a plain ``mkdir`` or ``open`` would have given it.
"""

from __future__ import annotations

import os
from pathlib import Path


def umask() -> int:
    """The process's umask (read by setting it and back: there is no getter)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def as_umask_allows(path: str | Path) -> None:
    """Give ``path`` (a folder or a file made by ``tempfile``) the mode ``mkdir`` / ``open`` would give it."""
    full = 0o777 if Path(path).is_dir() else 0o666
    os.chmod(path, full & ~umask())
