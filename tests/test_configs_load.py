"""Every YAML file under configs/ (recursively) loads, validates and round-trips with its algorithm's config.

A file's algorithm is named by a leading comment line `# rlhf train <algo>` (which is also how to run it);
otherwise by its folder (`configs/dpo/hh.yaml`) or its filename prefix (`configs/dpo_hh.yaml`, `sft.yaml`).
A file whose trainer module is not written yet is skipped with the reason; no YAML at all skips one test.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from rlhf.cli import ALGORITHMS, NotAvailable, train_config, trainer_module
from rlhf.config import load_config, save_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
FILES = sorted(p for p in CONFIGS.rglob("*") if p.suffix in (".yaml", ".yml") and p.is_file())
COMMENT = re.compile(r"#\s*rlhf train (\S+)")


def algorithm_of(path: Path, root: Path = CONFIGS) -> str | None:
    """The algorithm a config file is for: leading `# rlhf train ALGO` comment, else folder, else name prefix."""
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.startswith("#"):
            break
        match = COMMENT.match(line)
        if match:
            return match.group(1)
    relative = path.relative_to(root)
    if len(relative.parts) > 1 and relative.parts[0] in ALGORITHMS:
        return relative.parts[0]
    prefix = re.split(r"[_.\-]", path.stem)[0]
    return prefix if prefix in ALGORITHMS else None


PARAMS = [pytest.param(p, id=str(p.relative_to(CONFIGS))) for p in FILES] or [
    pytest.param(None, marks=pytest.mark.skip(reason="no YAML files under configs/ yet"), id="none")
]


@pytest.mark.parametrize("path", PARAMS)
def test_config_file_loads(path: Path, tmp_path: Path) -> None:
    algorithm = algorithm_of(path)
    assert algorithm in ALGORITHMS, (
        f"cannot tell which algorithm {path.relative_to(CONFIGS)} is for: start it with a comment "
        f"'# rlhf train <algo>' or name it <algo>_*.yaml or <algo>/*.yaml (algorithms: {', '.join(ALGORITHMS)})"
    )
    try:
        module = trainer_module(algorithm)
    except NotAvailable as exc:
        pytest.skip(str(exc))
    cfg = train_config(algorithm, module, str(path))
    assert load_config(module.Config, save_config(cfg, tmp_path / "config.yaml")) == cfg


def test_algorithm_of(tmp_path: Path) -> None:
    files = {
        "sft.yaml": "model: {path: x}\n",
        "dpo_hh.yaml": "",
        "ppo/tldr.yaml": "",
        "tldr.yaml": "# A GRPO run on TL;DR\n#   rlhf train grpo --config configs/tldr.yaml\n",
        "late.yaml": "model: {}\n# rlhf train dpo\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert [algorithm_of(tmp_path / name, tmp_path) for name in files] == ["sft", "dpo", "ppo", "grpo", None]
