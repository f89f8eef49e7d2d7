"""`rlhf demo --quick`: the whole pipeline runs end to end, writes its evaluation and a report with every section.

(A tenth of the steps: a smoke run of the machinery, not a result; the full demo's figures are in the README.)
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from rlhf.cli import main

SECTIONS = ("Summary", "Evaluation on held-out prompts", "Over-optimisation", "Reward model", "Training curves",
            "Sample answers")  # fmt: skip


def test_quick_demo_runs_every_stage_and_reports_it(tmp_path: Path) -> None:
    assert main(["demo", "--quick", "--out", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    policies = summary["policies"]
    assert list(policies) == ["sft", "dpo", "ppo", "grpo", "grpo_overopt"]
    for name, p in policies.items():
        assert (tmp_path / name / "final" / "model.safetensors").is_file()
        assert 0.0 <= p["gold"] <= 1.0 and p["kl"] >= 0.0
        assert (name == "sft") == ("win_rate" not in p)
    assert policies["sft"]["gold"] > 0.3  # a tenth of the SFT steps already writes letters
    assert 0.85 < summary["labeller_agreement"] < 0.97 and 0.5 < summary["reward_model"]["accuracy"] <= 1.0
    assert {"sft", "rm", "dpo", "ppo", "grpo", "grpo_overopt", "evaluation", "report"} <= set(summary["seconds"])

    evaluation = json.loads((tmp_path / "eval.json").read_text())
    assert evaluation["prompts"] == 256 and len(evaluation["samples"]) == 256
    overopt = [json.loads(line) for line in (tmp_path / "grpo_overopt" / "metrics.jsonl").read_text().splitlines()]
    assert any("eval/gold" in m and "eval/kl" in m for m in overopt)

    page = (tmp_path / "report.html").read_text()
    for section in SECTIONS:
        assert f"<h2>{section}</h2>" in page, section
    images = re.findall(r'<img alt="[^"]*" src="([^"]*)"', page)
    assert len(images) >= 8 and all(src.startswith("data:image/png;base64,") for src in images)
    assert not re.search(r'(src|href)="(https?:)?//', page)  # nothing to fetch: it opens offline
