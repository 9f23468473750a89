"""Builds cjm with its pure core (engine/machine) compiled to C by mypyc.

The core runs for every input of every lead. Compiled, its values are native classes
and its calls are C calls: about twice as fast as the same source interpreted
(bench/step.py measures both). The source stays plain, typed Python, checked by
`mypy --strict` like the rest, and runs uncompiled too.

Beside the extensions the build writes engine/machine/_compiled.py, the SHA-256 of
each source it compiled, so that an edited source is never run as its stale build
(engine/machine/__init__.py). Everything else about the distribution is in
pyproject.toml.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from mypyc.build import mypycify
from setuptools import setup

HERE = Path(__file__).parent
CORE = Path("engine", "machine")
# Imported by one another in this order: the values, the plan of a map, step(), advance().
COMPILED = ("values", "plan", "step", "lead")


def write_manifest() -> None:
    digests = {
        name: hashlib.sha256((HERE / CORE / f"{name}.py").read_bytes()).hexdigest()
        for name in COMPILED
    }
    lines = "".join(f'    "{name}": "{digest}",\n' for name, digest in digests.items())
    (HERE / CORE / "_compiled.py").write_text(
        '"""Written by setup.py: the SHA-256 of each module of the core it compiled."""\n\n'
        f"SOURCES = {{\n{lines}}}\n"
    )


write_manifest()
setup(
    ext_modules=mypycify(
        [
            # Not pyproject.toml's [tool.mypy]: the build's environment has mypy alone,
            # not pydantic and the rest, whose types the modules the core imports use.
            # `make lint` checks them all with their types; here what the core imports
            # is read for its types without its own errors counting.
            "--config-file=",
            "--ignore-missing-imports",
            "--follow-imports=silent",
            *(str(CORE / f"{name}.py") for name in COMPILED),
        ],
        # One shared library inside the package, not a top-level module of its own.
        group_name="engine.machine.core",
    )
)
