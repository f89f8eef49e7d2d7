"""`rlhf demo --quick`: the whole pipeline runs end to end and each stage's output is usable."""

from __future__ import annotations

import json
from pathlib import Path

from rlhf.cli import main


def test_quick_demo_runs_every_stage_and_sft_beats_the_base_model(tmp_path: Path) -> None:
    assert main(["demo", "--quick", "--out", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    policies = summary["policies"]
    assert list(policies) == ["base", "sft", "dpo", "ppo"]
    assert policies["base"]["gold/score"] < 0.05  # a random tiny model never sorts
    assert policies["sft"]["gold/score"] > 0.3  # a tenth of the SFT steps already learns the format
    for stage in ("dpo", "ppo"):
        assert (tmp_path / stage / "final" / "model.safetensors").is_file()
        assert policies[stage]["gold/score"] > 0.3
    assert summary["reward_model"]["accuracy"] > 0.55
    assert set(summary["seconds"]) == {"sft", "rm", "dpo", "ppo"}
