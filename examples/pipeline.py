"""SFT -> reward model -> PPO and DPO from Python, with a Python reward function, on the built-in task.

    python examples/pipeline.py --out runs/example            # a few minutes on a CPU
    python examples/pipeline.py --out /tmp/example --quick    # a smoke run of the same calls

Each stage is `rlhf.train(algorithm, **sections)`, which validates its config as `rlhf train` does and returns
the run directory; `final/` in it is a plain `transformers` checkpoint. PPO here is trained on a Python reward
(`brevity_gold` below: the task's gold score, minus a little per character), given as `path/to/file.py:function`.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import rlhf


def brevity_gold(prompts: Sequence[Any], completions: Sequence[str], letters: Sequence[str], **_: Any) -> list[float]:
    """A reward function: the gold score of each completion, minus 0.01 per character (the row's `letters` come
    from the prompt file's extra field)."""
    from rlhf.tasks.lazy_sorting import gold_score

    return [gold_score(lt, c) - 0.01 * len(c) for lt, c in zip(letters, completions, strict=True)]


def main(argv: Sequence[str] | None = None) -> dict[str, Path]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/example", help="where the data, the models and the runs go")
    parser.add_argument("--quick", action="store_true", help="a tenth of the steps")
    args = parser.parse_args(argv)

    from rlhf.tasks.lazy_sorting import write_task_files
    from rlhf.tasks.tiny import make_tiny_checkpoint

    out, scale = Path(args.out), 0.1 if args.quick else 1.0
    data = write_task_files(out / "data", n_train=2048, n_eval=64)
    base = make_tiny_checkpoint(out / "base", "llama", hidden_size=64, num_layers=2)
    common = {"schedule": {"name": "constant"}, "logging": {"progress": False}}

    def steps(n: int) -> int:
        return max(2, int(n * scale))

    sft = rlhf.train("sft", output_dir=str(out / "sft"), model={"path": str(base)}, data={"train": str(data["sft"])},
                     optim={"lr": 3e-3}, train={"batch_size": 32, "micro_batch_size": 32, "max_steps": steps(300)},
                     **common)  # fmt: skip
    policy = {"path": str(sft / "final")}
    rm = rlhf.train("rm", output_dir=str(out / "rm"), model=policy, data={"train": str(data["preference"])},
                    optim={"lr": 1e-3}, train={"batch_size": 32, "micro_batch_size": 32, "max_steps": steps(200)},
                    **common)  # fmt: skip
    ppo = rlhf.train(
        "ppo",
        output_dir=str(out / "ppo"),
        model=policy,
        data={"train": str(data["prompt"]), "max_length": 48, "max_prompt_length": 32},
        reward={"function": f"{Path(__file__).resolve()}:brevity_gold"},
        rollout={"batch_size": 32, "max_new_tokens": 12},
        optim={"lr": 1e-4},
        train={"batch_size": 32, "micro_batch_size": 32, "max_steps": steps(40)},
        **common,
    )
    dpo_cfg = rlhf.train_config("dpo", {"beta": 0.3}, output_dir=str(out / "dpo"), model=policy,
                                data={"train": str(data["preference"])}, optim={"lr": 1e-4},
                                train={"batch_size": 32, "micro_batch_size": 32, "max_steps": steps(100)},
                                **common)  # fmt: skip
    dpo = rlhf.train("dpo", dpo_cfg)
    runs = {"sft": sft, "rm": rm, "ppo": ppo, "dpo": dpo}
    for name, run in runs.items():
        print(f"{name}: {run / 'final'}")
    return runs


if __name__ == "__main__":
    main()
