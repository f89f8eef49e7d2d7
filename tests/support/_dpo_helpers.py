"""Helpers of the DPO-family and KTO trainer tests: task data, configs, and log-probs computed independently.

`plain_logps` is the reference implementation the trainers are checked against: one unpadded row at a time,
a full forward, `log_softmax` and `gather` written out here, no code shared with `rlhf.trainers`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from _resume import finish, kill_at_step, train_cli
from transformers import AutoModelForCausalLM

from rlhf.config import DataConfig, load_config, save_config
from rlhf.data import load_records, tokenize_records
from rlhf.models.loading import load_tokenizer
from rlhf.tasks.sorting import write_task_files

DATA = {"max_length": 48, "max_prompt_length": 24}


def task_files(root: Path, n_train: int = 256, n_eval: int = 64) -> dict[str, Path]:
    return write_task_files(root, n_train=n_train, n_eval=n_eval, seed=0)


def make_config(module: Any, **values: Any) -> Any:
    """module.Config from dotted keys (`"optim.lr": 1e-3`), with test defaults: no progress bar, fresh runs."""
    defaults = {
        "logging.progress": False,
        "checkpoint.resume": "never",
        "schedule.name": "constant",
        "data.max_length": DATA["max_length"],
        "data.max_prompt_length": DATA["max_prompt_length"],
    }
    merged = {**defaults, **values}
    return load_config(module.Config, None, [f"--{k}={json_value(v)}" for k, v in merged.items()])


def json_value(v: Any) -> str:
    if isinstance(v, bool):
        return str(v).lower()
    return "null" if v is None else str(v)


def examples(path: Path, kind: str, tokenizer: Any) -> list[dict[str, Any]]:
    records, _ = load_records(path, kind)
    return tokenize_records(records, kind, tokenizer, DataConfig(**DATA))[0]


def tokenizer_of(path: str | Path) -> Any:
    return load_tokenizer(str(path))


def load_model(path: str | Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


@torch.no_grad()
def plain_logps(model: torch.nn.Module, prompt_ids: list[int], response_ids: list[int]) -> tuple[float, int]:
    """(sum of log p(response token | everything before it), number of response tokens), one unpadded row."""
    ids = torch.tensor([prompt_ids + response_ids])  # (1, L)
    logits = model(input_ids=ids).logits[0, :-1].double()  # (L-1, V): position t predicts token t+1
    logp = torch.log_softmax(logits, dim=-1).gather(-1, ids[0, 1:, None]).squeeze(-1)  # (L-1,)
    return float(logp[len(prompt_ids) - 1 :].sum()), len(response_ids)


def pair_logps(model: torch.nn.Module, exs: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Summed and averaged log-probs of chosen and rejected of each pair, (B,) float64 each."""
    out: dict[str, list[float]] = {"chosen": [], "rejected": [], "chosen_avg": [], "rejected_avg": [], "chosen_n": []}
    for ex in exs:
        for side in ("chosen", "rejected"):
            s, n = plain_logps(model, ex["prompt_ids"], ex[f"{side}_ids"])
            out[side].append(s)
            out[f"{side}_avg"].append(s / n)
            if side == "chosen":
                out["chosen_n"].append(n)
    return {k: torch.tensor(v, dtype=torch.float64) for k, v in out.items()}


def implied_reward_accuracy(policy: Any, ref: Any, exs: list[dict[str, Any]], *, average: bool = False) -> float:
    """Held-out pair accuracy of the implied reward: policy - ref log-probs (summed, or averaged), chosen > rejected.

    With `ref=None`, the reference-free reward (SimPO's and ORPO's: the averaged log-prob itself; ORPO's log odds
    are increasing in it, so they order pairs the same way).
    """
    pol = pair_logps(policy, exs)
    key = "{}_avg" if average else "{}"
    c, r = pol[key.format("chosen")], pol[key.format("rejected")]
    if ref is not None:
        base = pair_logps(ref, exs)
        c, r = c - base[key.format("chosen")], r - base[key.format("rejected")]
    return float((c > r).double().mean())


def metrics(run_dir: Path) -> list[dict[str, float]]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------- SIGKILL + resume through the command line


def kill_and_resume(algo: str, cfg: Any, run_dir: Path, kill_at: int) -> dict[str, int]:
    """Start `rlhf train ALGO`, SIGKILL it once metrics.jsonl shows `kill_at`, then run the same command again.

    Returns {name: mtime_ns} of the reference cache files as the killed run left them.
    """
    config = save_config(cfg, run_dir.parent / f"{run_dir.name}.yaml")
    kill_at_step(train_cli(algo, config), run_dir, kill_at)
    cache = {f.name: f.stat().st_mtime_ns for f in (run_dir / "ref_logps").glob("*")}
    finish(train_cli(algo, config))
    return cache


def quick_sft(base: str | Path, sft_path: Path, out: Path, *, steps: int = 150, lr: float = 3e-3) -> Path:
    """A few seeded SFT steps on the task's demonstrations (a plain loop), saved with save_pretrained.

    KTO needs a policy that already answers in the task's format: from a random init its implied reward is
    dominated by learning the format, which lifts every completion (and the mismatched KL pairs) alike.
    """
    from rlhf.data import collate_sft

    tok = tokenizer_of(base)
    exs = examples(sft_path, "sft", tok)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        idx = torch.randint(len(exs), (16,), generator=g).tolist()
        loss = model(**collate_sft([exs[i] for i in idx], tok.pad_token_id)).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@torch.no_grad()
def unpaired_logps(model: torch.nn.Module, exs: list[dict[str, Any]], shift: int = 0) -> torch.Tensor:
    """Summed completion log-probs, (B,) float64: row k scores completion (k + shift) % B after prompt k."""
    n = len(exs)
    return torch.tensor(
        [plain_logps(model, ex["prompt_ids"], exs[(k + shift) % n]["completion_ids"])[0] for k, ex in enumerate(exs)],
        dtype=torch.float64,
    )
