"""Regenerate the section tables of docs/config.md from the config dataclasses: `python docs/make_config_tables.py`.

Everything above "## Shared sections" is kept as written; the tables below it come from the field docstrings
(`rlhf.config.config_markdown`, as `--help` does), and tests/test_config.py checks that they still match.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from rlhf.config import (  # noqa: E402
    CheckpointConfig,
    DataConfig,
    LoggingConfig,
    ModelConfig,
    OptimConfig,
    ScheduleConfig,
    TrainConfig,
    config_markdown,
)
from rlhf.rollout.config import KLConfig, OnlineEvalConfig, RewardConfig, RolloutConfig  # noqa: E402

SHARED = [("model", ModelConfig), ("data", DataConfig), ("optim", OptimConfig), ("schedule", ScheduleConfig),
          ("train", TrainConfig), ("logging", LoggingConfig), ("checkpoint", CheckpointConfig)]  # fmt: skip
ONLINE = [("rollout", RolloutConfig), ("reward", RewardConfig), ("kl", KLConfig), ("eval", OnlineEvalConfig)]
SHARED_INTRO = (
    "Every algorithm's config nests these (the tables are generated from the field docstrings, as `--help` is: "
    "`python docs/make_config_tables.py`).\n"
)
ONLINE_INTRO = (
    "`rollout`, `reward`, `kl` and `eval` (`rlhf.rollout.config`); each algorithm's own fields are in "
    "`rlhf train ALGO --help`. GRPO's `kl` defaults to `coef: 0.04`, `estimator: k3` (the GRPO paper's KL in the "
    "loss).\n"
)


def tables(sections: list[tuple[str, type]]) -> str:
    return "".join(f"\n### `{name}` ({cls.__name__})\n\n" + config_markdown(cls, f"{name}.") for name, cls in sections)


def main() -> None:
    page = Path(__file__).resolve().parent / "config.md"
    text = page.read_text()
    head = text[: text.index("## Shared sections")].rstrip()
    page.write_text(
        f"{head}\n\n## Shared sections\n\n{SHARED_INTRO}{tables(SHARED)}"
        f"\n## Sections of the online trainers (PPO, GRPO, RLOO)\n\n{ONLINE_INTRO}{tables(ONLINE)}"
    )


if __name__ == "__main__":
    main()
