"""The `rlhf` command: `main(argv) -> exit status` (the process: `run()`), dispatching to modules imported lazily.

    rlhf demo [--out DIR]
    rlhf train {sft,rm,ppo,dpo,kto,grpo,rloo} [--config FILE.yaml] [--section.key VALUE ...]
    rlhf eval ...
    rlhf report RUN_DIR
    rlhf data check FILE --kind {sft,preference,unpaired,prompt} [--tokenizer DIR] [--skip-bad-rows] ...

Contracts with the modules it dispatches to (a module that is missing, or lacks these names, is reported
as "not available yet" with exit status 2):

- `rlhf train ALGO` imports `ALGORITHMS[ALGO]`, which defines `Config` (a config dataclass, every field
  defaulted), `train(cfg: Config) -> Path` (returns the run directory) and optionally
  `PRESETS: dict[str, Mapping]`: per algorithm name, nested values applied before the YAML file (so one
  module can serve two names, e.g. `{"rloo": {"advantage": {"estimator": "rloo"}}}`).
- `rlhf demo|eval|report ARGS...` call `main(argv: list[str]) -> int` of `TOOLS[...]` with the arguments after
  the subcommand; each module owns its options and its `--help`.
- `rlhf data check` calls `rlhf.data.check.data_check(path, kind, tokenizer_path=..., skip_bad_rows=...,
  [max_length=...], [max_prompt_length=...]) -> int` (the max lengths only when given).

Importing this module is cheap (no torch, no transformers) so `rlhf --help` answers at once.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import os
import signal
import sys
import threading
from collections.abc import Sequence
from types import ModuleType
from typing import Any, NoReturn

from rlhf import __version__
from rlhf.errors import EXIT_INTERRUPTED, UserError
from rlhf.runtime.signals import stop_while_loading

ALGORITHMS: dict[str, str] = {
    "sft": "rlhf.trainers.sft",
    "rm": "rlhf.trainers.reward",
    "ppo": "rlhf.trainers.ppo",
    "dpo": "rlhf.trainers.dpo",
    "kto": "rlhf.trainers.kto",
    "grpo": "rlhf.trainers.grpo",
    "rloo": "rlhf.trainers.grpo",
}
"""Algorithm name -> module defining `Config` and `train` (and optionally `PRESETS`)."""

TOOLS: dict[str, str] = {"demo": "rlhf.demo", "eval": "rlhf.evaluation.cli", "report": "rlhf.report.cli"}
"""Subcommand -> module defining `main(argv: list[str]) -> int`."""

DATA_KINDS = ("sft", "preference", "unpaired", "prompt")

EPILOG = f"""\
exit status:
  0  success
  1  a problem with the data or the run to fix (one line on stderr: `rlhf: error: ...`)
  2  a usage or config error (unknown key, wrong type, value out of range), or a command not available yet
  {EXIT_INTERRUPTED} stopped by SIGTERM (or by SIGINT once training runs), the work done so far checkpointed: the same
     command resumes from it (a scheduler may requeue the job)
  130 interrupted by SIGINT (Ctrl-C) before training started
"""

OVERRIDES_HELP = """\
Every field below can be set in the --config YAML file (nested sections) or on the command line as
`--section.key VALUE` or `--section.key=VALUE`; the command line wins over the file. Lists: `a,b,c` or a
JSON list; `null` unsets an optional value; a boolean flag given alone means true."""


class NotAvailable(UserError):
    """A subcommand whose module is not written yet; printed as is, exit status 2."""

    exit_code = 2


def import_entry(module_name: str, names: Sequence[str], command: str) -> ModuleType:
    """Import `module_name` and check it defines `names`; else `NotAvailable` ("<command>: not available yet").

    Only a missing `module_name` itself counts as not available: a module that fails to import one of *its*
    dependencies raises the original error.
    """
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is None or not (module_name == exc.name or module_name.startswith(exc.name + ".")):
            raise
        raise NotAvailable(f"{command}: not available yet (planned)") from None
    if not all(hasattr(module, name) for name in names):
        raise NotAvailable(f"{command}: not available yet (planned)")
    return module


def trainer_module(algorithm: str) -> ModuleType:
    """The module of `rlhf train <algorithm>` (it defines `Config` and `train`)."""
    return import_entry(ALGORITHMS[algorithm], ("Config", "train"), f"rlhf train {algorithm}")


def train_config(algorithm: str, module: ModuleType, path: str | None, overrides: Sequence[str] = ()) -> Any:
    """The validated config of one training run: defaults, the module's preset, the YAML file, the overrides."""
    from rlhf.config import load_config

    preset = getattr(module, "PRESETS", {}).get(algorithm)
    return load_config(module.Config, path, overrides, preset=preset)


def train_help(algorithm: str, module: ModuleType) -> str:
    """`rlhf train <algorithm> --help`: usage, the module's summary, and every config field with its doc."""
    from rlhf.config import config_help

    lines = [f"usage: rlhf train {algorithm} [--config FILE.yaml] [--section.key VALUE ...]", ""]
    summary = (module.__doc__ or "").strip().split("\n\n")[0]
    if summary:
        lines += [summary, ""]
    preset = getattr(module, "PRESETS", {}).get(algorithm)
    if preset:
        lines += [f"{algorithm} presets (applied before the config file): {json.dumps(preset)}", ""]
    lines += [OVERRIDES_HELP, "", config_help(module.Config), "", EPILOG]
    return "\n".join(lines)


class _TrainHelp(argparse.Action):
    """`-h/--help` of `rlhf train`: after an algorithm, defer to `train_help`; alone, the usual help."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, *_: Any) -> None:
        if getattr(namespace, "algorithm", None) is None:
            parser.print_help()
            parser.exit()
        namespace.help = True


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of `rlhf` (overrides and the arguments of demo, eval and report pass through)."""
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog="rlhf",
        description="Align language models with human preferences: SFT, reward models, PPO, GRPO and the DPO family.",
        epilog=EPILOG,
        formatter_class=formatter,
        allow_abbrev=False,
    )
    parser.add_argument("--version", action="version", version=f"rlhf {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sub.add_parser("demo", help="the whole pipeline on the built-in task (rlhf demo [--out DIR])", add_help=False)
    train = sub.add_parser(
        "train",
        help="train with one algorithm (rlhf train ALGO --help lists its config)",
        usage=f"rlhf train {{{','.join(ALGORITHMS)}}} [--config FILE.yaml] [--section.key VALUE ...]",
        description="Train with one algorithm. `rlhf train ALGO --help` lists every config field.\n\n" + OVERRIDES_HELP,
        epilog=EPILOG,
        formatter_class=formatter,
        add_help=False,
        allow_abbrev=False,
    )
    train.add_argument("-h", "--help", action=_TrainHelp, nargs=0, help="show the config fields and exit")
    train.add_argument("algorithm", choices=list(ALGORITHMS), help="the algorithm to run")
    train.add_argument("--config", metavar="FILE.yaml", help="YAML file of config values (nested sections)")
    sub.add_parser("eval", help="score policies: gold/proxy reward, KL, win rate, samples", add_help=False)
    sub.add_parser("report", help="plots and HTML from a run directory (rlhf report RUN_DIR)", add_help=False)

    data = sub.add_parser("data", help="data tools", allow_abbrev=False)
    data_sub = data.add_subparsers(dest="data_command", required=True, metavar="COMMAND")
    check = data_sub.add_parser(
        "check", help="validate and summarise a data file", epilog=EPILOG, formatter_class=formatter, allow_abbrev=False
    )
    check.add_argument("file", metavar="FILE", help="a .jsonl, .json, .parquet or .csv file, or a datasets directory")
    check.add_argument("--kind", required=True, choices=DATA_KINDS, help="the kind of rows the file must hold")
    check.add_argument("--tokenizer", metavar="DIR", help="also report token lengths with this tokenizer")
    check.add_argument("--skip-bad-rows", action="store_true", help="count invalid rows by reason instead of stopping")
    check.add_argument("--max-length", type=int, metavar="N", help="maximum tokens of prompt + response")
    check.add_argument("--max-prompt-length", type=int, metavar="N", help="maximum prompt tokens")
    return parser


def _run(parser: argparse.ArgumentParser, args: argparse.Namespace, extras: list[str]) -> int:
    if args.command == "train":
        with stop_while_loading():
            return _train(args, extras)
    if args.command in TOOLS:
        module = import_entry(TOOLS[args.command], ("main",), f"rlhf {args.command}")
        return int(module.main(extras) or 0)
    if extras:
        parser.error(f"unrecognized arguments: {' '.join(extras)}")
    # the only other command: rlhf data check
    module = import_entry("rlhf.data.check", ("data_check",), "rlhf data check")
    kwargs: dict[str, Any] = {"tokenizer_path": args.tokenizer, "skip_bad_rows": args.skip_bad_rows}
    if args.max_length is not None:
        kwargs["max_length"] = args.max_length
    if args.max_prompt_length is not None:
        kwargs["max_prompt_length"] = args.max_prompt_length
    return int(module.data_check(args.file, args.kind, **kwargs))


def _train(args: argparse.Namespace, extras: list[str]) -> int:
    module = trainer_module(args.algorithm)  # imports torch and transformers: seconds, SIGTERM handled already
    if args.help:
        print(train_help(args.algorithm, module))
        return 0
    cfg = train_config(args.algorithm, module, args.config, extras)
    run_dir = module.train(cfg)
    if os.environ.get("RANK", "0") == "0":  # once for a launch of several processes (torchrun sets RANK)
        print(f"rlhf train {args.algorithm}: run directory {run_dir}")
    return 0


def _status(exc: SystemExit) -> int:
    if exc.code is None or isinstance(exc.code, int):
        return exc.code or 0
    print(exc.code, file=sys.stderr)
    return 1


def _error(message: object, status: int) -> int:
    print(f"rlhf: error: {message}", file=sys.stderr)
    return status


def main(argv: Sequence[str] | None = None) -> int:
    """Run `rlhf` with `argv` (default: the process arguments); return the exit status."""
    parser = build_parser()
    # transformers' per-load progress bars and load reports drown our own output (a fresh reward head is
    # expected, not news); read at its import, so set before anything imports it. A user's setting wins.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        args, extras = parser.parse_known_args(sys.argv[1:] if argv is None else list(argv))
        return _run(parser, args, extras)
    except SystemExit as exc:  # argparse errors and --help, or a delegated main() calling sys.exit
        return _status(exc)
    except NotAvailable as exc:
        print(exc, file=sys.stderr)
        return exc.exit_code
    except UserError as exc:
        return _error(exc, exc.exit_code)
    except FileNotFoundError as exc:
        return _error(f"{exc.strerror}: {exc.filename}" if exc.filename else exc, 1)
    except KeyboardInterrupt:
        return _error("interrupted", 130)


def run() -> NoReturn:
    """The `rlhf` process (its console script and `python -m rlhf`): exit with `main()`'s status.

    After main() returns, the interpreter's last garbage collections walked every object that torch and
    `transformers` made, ~0.8-0.9 s of every command's exit (py-spy: `gc_collect_main`); frozen (`gc.freeze`), they
    are left to the end of the process: ~0.1 s. A SIGTERM in that time ends the process at once with main()'s
    status instead of the default -15, so a finished run is not reported killed; before main() took over
    (argument parsing) it ends it as by default.
    """
    status: list[int] = []

    def exiting(signum: int, frame: Any) -> None:
        if not status:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status[0])

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, exiting)  # `rlhf train` puts it back after its own handlers
    status.append(main())
    gc.freeze()
    sys.exit(status[0])


if __name__ == "__main__":
    run()
