"""The `rlhf` command: dispatch, exit statuses and messages, `--help` generated from the config dataclasses."""

from __future__ import annotations

import subprocess
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from rlhf import cli
from rlhf.config import OptimConfig, TrainConfig
from rlhf.errors import UserError


@dataclass
class FakeConfig:
    beta: float = 0.1
    """KL coefficient."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Batches and steps."""


def fake_module(name: str, **attrs: Any) -> types.ModuleType:
    module = types.ModuleType(name, "A fake trainer for the CLI tests.\n\nMore text.")
    for key, value in attrs.items():
        setattr(module, key, value)
    return module


@pytest.fixture
def trainer(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> dict[str, Any]:
    """`rlhf train sft` and `rlhf train rloo` dispatch to a fake module; `calls["cfg"]` is the config trained."""
    calls: dict[str, Any] = {}

    def train(cfg: FakeConfig) -> Path:
        calls["cfg"] = cfg
        return tmp_path / "run"

    module = fake_module("fake_trainer", Config=FakeConfig, train=train, PRESETS={"rloo": {"beta": 0.5}})
    monkeypatch.setitem(sys.modules, "fake_trainer", module)
    monkeypatch.setitem(cli.ALGORITHMS, "sft", "fake_trainer")
    monkeypatch.setitem(cli.ALGORITHMS, "rloo", "fake_trainer")
    return calls


def test_train_runs_with_config_and_overrides(trainer: dict[str, Any], tmp_path: Path, capsys: Any) -> None:
    path = tmp_path / "sft.yaml"
    path.write_text("beta: 0.2\noptim: {lr: 1e-4}\n")
    assert cli.main(["train", "sft", "--config", str(path), "--optim.lr", "3e-4", "--train.epochs=2"]) == 0
    cfg = trainer["cfg"]
    assert (cfg.beta, cfg.optim.lr, cfg.train.epochs) == (0.2, 3e-4, 2)
    assert capsys.readouterr().out == f"rlhf train sft: run directory {tmp_path / 'run'}\n"


def test_train_without_config_uses_defaults_and_presets(trainer: dict[str, Any]) -> None:
    assert cli.main(["train", "sft"]) == 0 and trainer["cfg"] == FakeConfig()
    assert cli.main(["train", "rloo"]) == 0 and trainer["cfg"].beta == 0.5
    assert cli.main(["train", "rloo", "--beta", "0.7"]) == 0 and trainer["cfg"].beta == 0.7


def test_train_help_lists_every_dotted_field(trainer: dict[str, Any], capsys: Any) -> None:
    assert cli.main(["train", "sft", "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(
        "usage: rlhf train sft [--config FILE.yaml] [--section.key VALUE ...]\n\nA fake trainer for the CLI tests.\n\n"
    )
    assert "  --beta float  (default: 0.1)\n      KL coefficient.\n" in out
    assert "\noptim:  Optimizer.\n  --optim.lr float  (default: 1e-05)\n      Peak learning rate of AdamW.\n" in out
    assert (
        "  --train.epochs int  (default: 1)\n      Passes over the training data (ignored when max_steps is set).\n"
        in out
    )
    assert "exit status:" in out and "cfg" not in trainer  # help does not train
    assert cli.main(["train", "rloo", "-h"]) == 0
    assert 'rloo presets (applied before the config file): {"beta": 0.5}' in capsys.readouterr().out


def test_train_help_without_algorithm(capsys: Any) -> None:
    assert cli.main(["train", "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: rlhf train {sft,rm,ppo,dpo,kto,grpo,rloo} [--config FILE.yaml]")
    assert "--section.key VALUE" in out


def test_train_module_missing_is_not_available(monkeypatch: pytest.MonkeyPatch, capsys: Any) -> None:
    monkeypatch.setitem(cli.ALGORITHMS, "ppo", "rlhf.trainers.not_written_yet")
    for argv in (["train", "ppo"], ["train", "ppo", "--help"], ["train", "ppo", "--optim.lr", "1"]):
        assert cli.main(argv) == 2
        captured = capsys.readouterr()
        assert (captured.out, captured.err) == ("", "rlhf train ppo: not available yet (planned)\n")


def test_train_module_without_contract_is_not_available(monkeypatch: pytest.MonkeyPatch, capsys: Any) -> None:
    monkeypatch.setitem(sys.modules, "half_written", fake_module("half_written", Config=FakeConfig))
    monkeypatch.setitem(cli.ALGORITHMS, "kto", "half_written")
    assert cli.main(["train", "kto"]) == 2
    assert capsys.readouterr().err == "rlhf train kto: not available yet (planned)\n"


def test_train_module_with_missing_dependency_keeps_traceback(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / "broken_trainer.py").write_text("import a_dependency_that_is_not_installed\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(cli.ALGORITHMS, "dpo", "broken_trainer")
    with pytest.raises(ModuleNotFoundError, match="a_dependency_that_is_not_installed"):
        cli.main(["train", "dpo"])


def test_unknown_algorithm_is_a_usage_error(capsys: Any) -> None:
    assert cli.main(["train", "foo"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: rlhf train {sft,rm,ppo,dpo,kto,grpo,rloo}")
    assert "rlhf train: error: argument algorithm: invalid choice: 'foo' (choose from 'sft', 'rm'," in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--optim.lrr", "1"], "rlhf: error: unknown key 'optim.lrr' (did you mean 'optim.lr'?)\n"),
        (["--optim.lr", "fast"], "rlhf: error: optim.lr: expected float, got 'fast' (str)\n"),
        (
            ["--train.micro_batch_size", "3"],
            "rlhf: error: train.batch_size: must be a multiple of micro_batch_size (3), got 8\n",
        ),
        (["--config", "missing.yaml"], "rlhf: error: config file not found: missing.yaml\n"),
        (["extra"], "rlhf: error: unexpected argument 'extra' (overrides look like --section.key VALUE)\n"),
    ],
)
def test_config_errors_are_one_line_exit_2(trainer: dict[str, Any], capsys: Any, argv: list[str], message: str) -> None:
    assert cli.main(["train", "sft", *argv]) == 2
    captured = capsys.readouterr()
    assert (captured.out, captured.err) == ("", message) and "cfg" not in trainer


def test_user_errors_from_a_run_are_one_line_exit_1(monkeypatch: pytest.MonkeyPatch, capsys: Any) -> None:
    from rlhf.data import DataError

    errors = {
        "user": UserError("the reward model has 2 labels; expected 1"),
        "missing": FileNotFoundError(2, "No such file or directory", "data/train.jsonl"),
        "data": DataError("train.jsonl", 3, "prompt", "missing field"),
    }

    def train(cfg: FakeConfig) -> Path:
        raise errors[current]

    monkeypatch.setitem(sys.modules, "fake_trainer", fake_module("fake_trainer", Config=FakeConfig, train=train))
    monkeypatch.setitem(cli.ALGORITHMS, "sft", "fake_trainer")
    expected = {
        "user": "rlhf: error: the reward model has 2 labels; expected 1\n",
        "missing": "rlhf: error: No such file or directory: data/train.jsonl\n",
        "data": "rlhf: error: train.jsonl:3: prompt: missing field\n",
    }
    for current in errors:
        assert cli.main(["train", "sft"]) == 1
        assert capsys.readouterr().err == expected[current]


def test_unexpected_errors_keep_their_traceback(monkeypatch: pytest.MonkeyPatch) -> None:
    def train(cfg: FakeConfig) -> Path:
        raise RuntimeError("a bug")

    monkeypatch.setitem(sys.modules, "fake_trainer", fake_module("fake_trainer", Config=FakeConfig, train=train))
    monkeypatch.setitem(cli.ALGORITHMS, "sft", "fake_trainer")
    with pytest.raises(RuntimeError, match="a bug"):
        cli.main(["train", "sft"])


@pytest.mark.parametrize("command", ["demo", "eval", "report"])
def test_tools_not_available_yet(monkeypatch: pytest.MonkeyPatch, capsys: Any, command: str) -> None:
    monkeypatch.setitem(cli.TOOLS, command, f"rlhf.not_written_{command}")
    assert cli.main([command, "--help"]) == 2
    assert capsys.readouterr().err == f"rlhf {command}: not available yet (planned)\n"


def test_tools_get_the_arguments_after_the_subcommand(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[list[str]] = []

    def main(argv: list[str]) -> int:
        seen.append(argv)
        return 3

    monkeypatch.setitem(sys.modules, "fake_tool", fake_module("fake_tool", main=main))
    for command in ("demo", "eval", "report"):
        monkeypatch.setitem(cli.TOOLS, command, "fake_tool")
    assert cli.main(["demo", "--out", "runs/demo"]) == 3
    assert cli.main(["report", "runs/demo", "--help"]) == 3
    assert cli.main(["eval", "--policy", "a", "-n", "-1"]) == 3
    assert seen == [["--out", "runs/demo"], ["runs/demo", "--help"], ["--policy", "a", "-n", "-1"]]


def test_data_check_dispatch(monkeypatch: pytest.MonkeyPatch, capsys: Any) -> None:
    calls: list[tuple[Any, ...]] = []

    def data_check(path: str, kind: str, **kwargs: Any) -> int:
        calls.append((path, kind, kwargs))
        return 1

    monkeypatch.setitem(sys.modules, "rlhf.data.check", fake_module("rlhf.data.check", data_check=data_check))
    assert cli.main(["data", "check", "a.jsonl", "--kind", "preference"]) == 1
    argv = ["data", "check", "b.jsonl", "--kind", "sft", "--tokenizer", "tok", "--skip-bad-rows", "--max-length", "64"]
    assert cli.main([*argv, "--max-prompt-length", "32"]) == 1
    assert calls == [
        ("a.jsonl", "preference", {"tokenizer_path": None, "skip_bad_rows": False}),
        (
            "b.jsonl",
            "sft",
            {"tokenizer_path": "tok", "skip_bad_rows": True, "max_length": 64, "max_prompt_length": 32},
        ),
    ]
    assert cli.main(["data", "check", "a.jsonl", "--kind", "preference", "--bogus"]) == 2
    assert "rlhf: error: unrecognized arguments: --bogus" in capsys.readouterr().err
    assert cli.main(["data", "check", "a.jsonl", "--kind", "pairs"]) == 2
    assert "argument --kind: invalid choice: 'pairs'" in capsys.readouterr().err


def test_data_check_not_available(monkeypatch: pytest.MonkeyPatch, capsys: Any) -> None:
    monkeypatch.setitem(sys.modules, "rlhf.data.check", None)  # import raises ModuleNotFoundError
    assert cli.main(["data", "check", "a.jsonl", "--kind", "sft"]) == 2
    assert capsys.readouterr().err == "rlhf data check: not available yet (planned)\n"


def test_top_level(capsys: Any) -> None:
    assert cli.main([]) == 2
    assert "rlhf: error: the following arguments are required: COMMAND" in capsys.readouterr().err
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out == f"rlhf {cli.__version__}\n"
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: rlhf [-h] [--version] COMMAND ...")
    assert "exit status:\n  0  success\n  1  a problem with the data" in out
    assert "\n  75 stopped by SIGTERM" in out and "\n  130 interrupted by SIGINT" in out  # the statuses of test_faults


def test_console_script_and_module_entry_points() -> None:
    script = Path(sys.executable).parent / "rlhf"
    if not script.exists():
        pytest.skip("the rlhf console script is not installed in this environment")
    result = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.startswith("usage: rlhf [-h] [--version] COMMAND ...")
    result = subprocess.run([sys.executable, "-m", "rlhf", "--version"], capture_output=True, text=True, timeout=60)
    assert (result.returncode, result.stdout) == (0, f"rlhf {cli.__version__}\n")


def test_importing_the_cli_is_cheap() -> None:
    code = "import sys, rlhf.cli; print(sorted(m for m in ('torch', 'transformers', 'yaml') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert result.stdout.strip() == "[]"
