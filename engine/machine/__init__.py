"""The pure core: journeys as state machines over immutable values, no I/O.

When cjm is installed its modules are compiled to C by mypyc (setup.py); run from a
checkout without a build, the same source runs interpreted. A compiled module whose
source has changed since is refused here, before anything imports it: running the
old build in place of an edited source would be a silent lie.
"""

from __future__ import annotations

import hashlib
from importlib.machinery import EXTENSION_SUFFIXES
from pathlib import Path


def _runs_compiled() -> bool:
    """Whether the core's modules load compiled; raises ImportError if a build is stale."""
    here = Path(__file__).parent
    # What Python would load in place of each source: an extension module beside it.
    compiled = sorted(
        source
        for source in here.glob("*.py")
        if any(source.with_suffix(suffix).is_file() for suffix in EXTENSION_SUFFIXES)
    )
    if not compiled:
        return False
    try:
        from engine.machine._compiled import SOURCES
    except ImportError:
        SOURCES = {}
    stale = [
        source.name
        for source in compiled
        if hashlib.sha256(source.read_bytes()).hexdigest() != SOURCES.get(source.stem)
    ]
    if stale:
        raise ImportError(
            f"engine/machine/{', '.join(stale)} changed since it was compiled: rebuild with "
            "`make` (or `pip install -e .`), or delete engine/machine/*.so to run the core "
            "uncompiled"
        )
    return True


COMPILED = _runs_compiled()
