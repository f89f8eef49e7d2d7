"""The math modules import only torch and math: they load with transformers, accelerate, datasets and numpy
blocked, and their source imports nothing else."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import rlhf

SRC = Path(rlhf.__file__).resolve().parent
MATH_FILES = sorted((SRC / "losses").glob("*.py")) + [SRC / "advantages.py"]
BLOCKED = ("transformers", "accelerate", "datasets", "numpy")

BLOCKER = f"""
import importlib.abc, sys
BLOCKED = {BLOCKED!r}
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError("blocked: " + name)  # what a missing package raises
        return None
sys.meta_path.insert(0, Block())
"""

IMPORTS = """
import rlhf.advantages
import rlhf.losses
import rlhf.losses.kl, rlhf.losses.logprobs, rlhf.losses.policy, rlhf.losses.preference
import rlhf.losses.reduce, rlhf.losses.reward, rlhf.losses.sft, rlhf.losses.value
loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
print("loaded-blocked:", loaded)
print("ok", len([m for m in sys.modules if m.startswith("rlhf.losses.")]))
"""


def _run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)


def test_imports_with_heavy_dependencies_blocked() -> None:
    """All eight modules import (8 rlhf.losses.* submodules loaded) and none of the blocked names is loaded.
    torch treats numpy as optional (it catches ModuleNotFoundError), so blocking numpy looks to torch like
    numpy not being installed."""
    result = _run(BLOCKER + IMPORTS)
    assert result.returncode == 0, result.stderr
    assert "loaded-blocked: []" in result.stdout
    assert "ok 8" in result.stdout


def test_blocker_actually_blocks() -> None:
    """Control: under the same blocker `import numpy` fails, so the test above can fail."""
    result = _run(BLOCKER + "import numpy\n")
    assert result.returncode != 0
    assert "blocked: numpy" in result.stderr


ALLOWED_ROOTS = {"torch", "math", "typing", "collections", "__future__", "rlhf"}


@pytest.mark.parametrize("path", MATH_FILES, ids=lambda p: p.name)
def test_source_imports_only_torch_and_math(path: Path) -> None:
    """Every import statement in the math modules names torch, math, typing, collections, __future__ or
    rlhf.losses."""
    tree = ast.parse(path.read_text())
    roots: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [node.module or ""]
        else:
            continue
        for name in names:
            roots.add(name.split(".")[0])
            if name.startswith("rlhf"):
                assert name.startswith("rlhf.losses"), f"{path.name} imports {name}"
    assert roots <= ALLOWED_ROOTS, f"{path.name} imports {sorted(roots - ALLOWED_ROOTS)}"
    assert "torch" in roots or path.name == "__init__.py"
