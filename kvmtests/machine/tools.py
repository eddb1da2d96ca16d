"""Host programs the suite runs (binutils, gcc, QEMU, ...): a missing one is one line naming its package."""
from __future__ import annotations

import shutil


class ToolMissing(RuntimeError):
    """A host program is not installed; the message names the Debian package that brings it."""


def require(tool: str, package: str) -> str:
    """The tool's path, so a missing install fails before any work is done."""
    path = shutil.which(tool)
    if path is None:
        raise ToolMissing(f"{tool} not found: install {package} (scripts/install.sh)")
    return path
