"""On PYTHONPATH, with CARESERVICE_TREE, in bench runs of another source tree (bench.ab, bench.instructions):
careservice.handlers and careservice.templates come from that tree's handlers/ and templates/.

The checkout's venv has careservice installed editable, and its finder maps those two packages to the
checkout it was installed from, whatever PYTHONPATH says: a variant's careservice/ came from its worktree,
but its stages and templates from the checkout's. Python imports sitecustomize at start-up from the path.
"""

from __future__ import annotations

import importlib.machinery
import os
import sys
from collections.abc import Sequence
from importlib.machinery import ModuleSpec
from types import ModuleType


class _TreeFinder:
    def __init__(self, tree: str) -> None:
        self.tree = tree

    def find_spec(self, name: str, path: Sequence[str] | None = None,
                  target: ModuleType | None = None) -> ModuleSpec | None:
        if name not in ("careservice.handlers", "careservice.templates"):
            return None
        return importlib.machinery.PathFinder.find_spec(name, [self.tree])  # <tree>/handlers, <tree>/templates


if os.environ.get("CARESERVICE_TREE"):
    sys.meta_path.insert(0, _TreeFinder(os.environ["CARESERVICE_TREE"]))
