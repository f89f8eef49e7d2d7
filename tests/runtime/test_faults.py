"""The fault paths, as a user meets them through `rlhf train`: each case reproduces what used to end badly (a
silent no-op run, a silent config change on resume, a checkpoint that cannot be loaded, a full disk, checkpoints
of diverged weights, tracebacks where one line was due) and checks what happens now."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from _resume import ENV

from rlhf.cli import main
from rlhf.runtime import checkpoint as ckpt
from rlhf.tasks.sorting import write_task_files

from _ppo_helpers import read_jsonl, write_prompts  # isort: skip


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_task_files(tmp_path_factory.mktemp("data"), n_train=64, n_eval=8)


def sft_args(tiny_dirs: dict[str, str], files: dict[str, Path], out: Path, *extra: str) -> list[str]:
    """The arguments of `rlhf train sft` (after the program) for a small run of the tiny llama on the task."""
    return ["train", "sft", f"--output_dir={out}", f"--model.path={tiny_dirs['llama']}",
            f"--data.train={files['sft']}", "--data.max_length=40", "--data.max_prompt_length=24",
            "--train.batch_size=4", "--train.micro_batch_size=4", "--optim.lr=3e-3", "--schedule.name=constant",
            "--logging.progress=false", *extra]  # fmt: skip


def sft(tiny_dirs: dict[str, str], files: dict[str, Path], out: Path, *extra: str) -> int:
    return main(sft_args(tiny_dirs, files, out, *extra))


def sigterm_here() -> None:
    """What a SIGTERM arriving at this point of the main thread does: its handler, called here."""
    signal.getsignal(signal.SIGTERM)(signal.SIGTERM, None)


def while_loading(monkeypatch: pytest.MonkeyPatch, action: Callable[[], None]) -> None:
    """`action()` runs while `rlhf train sft` loads (just before it makes its engine)."""
    import rlhf.trainers.sft as sft_module

    make_engine = sft_module.make_engine

    def act_then_make_engine(*args: Any, **kwargs: Any) -> Any:
        action()
        return make_engine(*args, **kwargs)

    monkeypatch.setattr(sft_module, "make_engine", act_then_make_engine)


def strict_json(path: Path) -> list[dict]:
    """Every line of a JSON-lines file parsed as standard JSON (bare NaN / Infinity are not JSON)."""

    def refuse(token: str) -> None:
        raise ValueError(f"{path}: {token} is not JSON")

    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


# ---------------------------------------------------------------- 1. a run that trained nothing


def test_a_run_that_made_no_update_fails_and_writes_no_final(tiny_dirs, files, tmp_path, capsys):
    """PPO on a reward of 1e38 per completion: the advantages overflow to inf, every update is skipped. Before:
    exit 0 with final/ equal to the input and NaN in metrics.jsonl. Now: exit 1 with one line, no final/, and
    metrics.jsonl is standard JSON with the non-finite values as strings."""
    (tmp_path / "huge.py").write_text("def f(prompts, completions, **_):\n    return [1e38] * len(completions)\n")
    prompts = write_prompts(tmp_path / "prompts.jsonl", 16)
    out = tmp_path / "ppo"
    status = main(["train", "ppo", f"--output_dir={out}", f"--model.path={tiny_dirs['llama']}",
                   f"--data.train={prompts}", f"--reward.function={tmp_path / 'huge.py'}:f", "--rollout.batch_size=4",
                   "--rollout.max_new_tokens=4", "--train.batch_size=4", "--train.micro_batch_size=4",
                   "--total_episodes=12", "--ppo_epochs=1", "--whiten_advantages=false",
                   "--logging.progress=false"])  # fmt: skip
    err = capsys.readouterr().err
    assert status == 1 and "Traceback" not in err
    assert "rlhf: error: none of the 3 optimizer steps made an update" in err and "final/ is not written" in err
    assert not (out / "final").exists()
    lines = strict_json(out / "metrics.jsonl")
    assert lines[-1]["train/nonfinite_skips"] == 3 and lines[0]["train/loss"] in ("NaN", "Infinity", "-Infinity")


def test_too_many_skipped_steps_fail_the_run(tiny_dirs, files, tmp_path, capsys):
    """An SFT run whose every step is non-finite (lr 1e30 makes the first update overflow, the rest are skipped):
    more than train.max_nonfinite_fraction of the steps skipped is an error at the end; 0 for
    max_consecutive_nonfinite means "never abort", as its doc says."""
    status = sft(tiny_dirs, files, tmp_path / "run", "--optim.lr=1e30", "--optim.max_grad_norm=0",
                 "--train.max_steps=6", "--train.max_consecutive_nonfinite=0")  # fmt: skip
    err = capsys.readouterr().err
    assert status == 1 and "more than train.max_nonfinite_fraction (0.1); final/ is not written" in err
    assert not (tmp_path / "run" / "final").exists()


# ---------------------------------------------------------------- 2. resuming with another config


def test_resuming_with_a_changed_config_is_refused_and_lists_the_changes(tiny_dirs, files, tmp_path, capsys, caplog):
    """A finished 8-step run rerun with another learning rate and batch size: exit 2, one line listing each change
    (old -> new) and both ways out; config.yaml is left alone. Allowed explicitly, it resumes; a longer run is an
    allowed, reported change whose (constant) learning rate carries on."""
    out = tmp_path / "run"
    assert sft(tiny_dirs, files, out, "--train.max_steps=8", "--checkpoint.every=4") == 0
    config = (out / "config.yaml").read_text()
    capsys.readouterr()
    assert sft(tiny_dirs, files, out, "--train.max_steps=8", "--checkpoint.every=4", "--optim.lr=1e-4",
               "--train.batch_size=8", "--train.micro_batch_size=8") == 2  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert "optim.lr 0.003 -> 0.0001; train.batch_size 4 -> 8; train.micro_batch_size 4 -> 8" in err
    assert "--checkpoint.resume never" in err and "--checkpoint.allow_config_change" in err
    assert (out / "config.yaml").read_text() == config

    assert sft(tiny_dirs, files, out, "--train.max_steps=12", "--checkpoint.every=4") == 0
    lines = read_jsonl(out / "metrics.jsonl")
    assert [m["step"] for m in lines] == list(range(1, 13)) and {m["train/lr"] for m in lines} == {3e-3}
    assert "with changed settings: train.max_steps 8 -> 12" in caplog.text  # the longer run is reported
    assert "the run is now 12 steps (it was 8)" in caplog.text

    allowed = ("--train.max_steps=12", "--optim.lr=1e-4", "--checkpoint.allow_config_change")
    assert sft(tiny_dirs, files, out, *allowed) == 0
    assert "optim.lr 0.003 -> 0.0001" in caplog.text


# ---------------------------------------------------------------- 3. a checkpoint that cannot be loaded


def rehash(path: Path) -> None:
    """Recompute a checkpoint's manifest for its files as they are now: the damage is invisible to it."""
    ckpt.write_manifest(path, int(path.name.removeprefix("step-")))


class Planted:  # pickled into optimizer.pt: weights_only must refuse it
    pass


@pytest.mark.parametrize("damage", ["truncated scheduler.pt", "garbage trainer_state.json", "planted pickle"])
def test_an_unloadable_checkpoint_falls_back_to_the_previous_one(tiny_dirs, files, tmp_path, capsys, caplog, damage):
    out = tmp_path / "run"
    assert sft(tiny_dirs, files, out, "--train.max_steps=8", "--checkpoint.every=4") == 0
    newest = out / "checkpoints" / "step-8"
    if damage == "truncated scheduler.pt":
        os.truncate(newest / "scheduler.pt", 100)
        name = "scheduler.pt"
    elif damage == "garbage trainer_state.json":
        (newest / "trainer_state.json").write_text('{"step": "eight"')
        name = "trainer_state.json"
    else:
        torch.save({"state": Planted()}, newest / "optimizer.pt")
        name = "optimizer.pt"
    rehash(newest)
    capsys.readouterr()
    assert sft(tiny_dirs, files, out, "--train.max_steps=8", "--checkpoint.every=4") == 0
    err = capsys.readouterr().err + caplog.text
    assert f"cannot resume from step-8: {newest / name}" in err and "trying the previous checkpoint" in err
    assert "weights_only" not in err and "Traceback" not in err
    assert [m["step"] for m in read_jsonl(out / "metrics.jsonl")] == list(range(1, 9))  # steps 5-8 again

    for step in (4, 8):  # now none of them loads: one line, no traceback
        torch.save({"state": Planted()}, out / "checkpoints" / f"step-{step}" / "optimizer.pt")
        rehash(out / "checkpoints" / f"step-{step}")
    assert sft(tiny_dirs, files, out, "--train.max_steps=8", "--checkpoint.every=4") == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("rlhf: error: no checkpoint in") and err.endswith(
        "start fresh with --checkpoint.resume never"
    )


# ---------------------------------------------------------------- 4. a full disk


def test_a_full_disk_is_one_line_removes_its_litter_and_keeps_the_earlier_checkpoints(
    tiny_dirs, files, tmp_path, capsys, monkeypatch
):
    """torch.save raising ENOSPC while step-8 is written (as on a full device): exit 74, "no space left on device"
    with the path and the bytes needed, no .tmp-step-8 left behind, step-4 intact and verified."""
    out = tmp_path / "run"
    real_save = torch.save

    def save(obj, f, *a, **kw):
        if ".tmp-step-8" in str(f):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *a, **kw)

    monkeypatch.setattr(torch, "save", save)
    assert sft(tiny_dirs, files, out, "--train.max_steps=8", "--checkpoint.every=4") == 74
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"rlhf: error: no space left on device writing {out / 'checkpoints'}: it needs about")
    assert "bytes)" in err and "earlier checkpoints are intact" in err and "Traceback" not in err
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-4"]
    ckpt.verify_checkpoint(out / "checkpoints" / "step-4")


# ---------------------------------------------------------------- 5. checkpoints during a non-finite streak


def test_no_checkpoint_is_written_while_a_non_finite_streak_is_open(tiny_dirs, files, tmp_path, caplog):
    """Four good steps (checkpoints 2 and 4), then lr 1e9: step 5's update ruins the weights (finite, huge), every
    later step is non-finite and skipped. Before, the checkpoints written meanwhile held the ruined weights and
    pushed out the good ones (keep_last 2); now none is written while the streak is open, so step-4, from before
    the divergence, is still there for a resume with a lower learning rate; and the run ends with an error, leaving
    the 4-step run's final/ as it was."""
    out = tmp_path / "run"
    assert sft(tiny_dirs, files, out, "--train.max_steps=4", "--checkpoint.every=2") == 0
    final = (out / "final" / "model.safetensors").read_bytes()
    status = sft(tiny_dirs, files, out, "--train.max_steps=12", "--checkpoint.every=2", "--optim.lr=1e9",
                 "--checkpoint.allow_config_change")  # fmt: skip
    assert status == 1 and "step 6: no checkpoint while a non-finite streak is open" in caplog.text
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-2", "step-4"]
    assert (out / "final" / "model.safetensors").read_bytes() == final


# ---------------------------------------------------------------- 6. one line instead of a traceback


def test_message_data_with_a_tokenizer_without_a_chat_template_names_both(tiny_dirs, files, tmp_path, capsys):
    import shutil

    plain = tmp_path / "plain"
    shutil.copytree(tiny_dirs["llama"], plain)
    config = json.loads((plain / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (plain / "tokenizer_config.json").write_text(json.dumps(config))
    (plain / "chat_template.jinja").unlink(missing_ok=True)
    assert main(["train", "sft", f"--output_dir={tmp_path / 'run'}", f"--model.path={plain}",
                 f"--data.train={files['sft']}", "--logging.progress=false"]) == 1  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"rlhf: error: {files['sft']}: the tokenizer has no chat template") and str(plain) in err


def test_a_bad_row_stops_training_with_one_line_that_says_how_to_list_or_skip_them(tiny_dirs, files, tmp_path, capsys):
    """Training stops at the first bad row, as before; the line also names the command that lists every bad row of the
    file and the key that skips them, and that command does list them."""
    rows = files["sft"].read_text().splitlines()[:6]
    rows[2] = json.dumps({"prompt": "sort: cba"})  # line 3: no completion
    rows[4] = json.dumps({"prompt": "sort: fed", "completon": "def"})  # line 5: misspelt
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(rows) + "\n")
    assert main(["train", "sft", f"--output_dir={tmp_path / 'run'}", f"--model.path={tiny_dirs['llama']}",
                 f"--data.train={bad}", "--logging.progress=false"]) == 1  # fmt: skip
    err = capsys.readouterr().err
    assert err == (
        f"rlhf: error: {bad}:3: completion: missing field (`rlhf data check {bad} --kind sft` lists every bad row; "
        "data.skip_bad_rows=true skips them)\n"
    )
    assert main(["data", "check", str(bad), "--kind", "sft"]) == 1
    listed = capsys.readouterr()
    assert f"{bad}:3:" in listed.out + listed.err and f"{bad}:5:" in listed.out + listed.err


def test_an_output_dir_that_is_a_file_is_one_line(tiny_dirs, files, tmp_path, capsys):
    (tmp_path / "taken").write_text("not a directory")
    assert sft(tiny_dirs, files, tmp_path / "taken", "--train.max_steps=2") == 1
    assert (
        capsys.readouterr().err.strip()
        == f"rlhf: error: output_dir: {tmp_path / 'taken'} exists and is not a directory"
    )


def test_sigterm_while_loading_exits_75_with_a_message(tiny_dirs, files, tmp_path):
    """SIGTERM before the first step (here: while the process imports torch and loads): exit 75, one line. Before,
    the default handler ended it with 143 and nothing said why."""
    cmd = [sys.executable, "-m", "rlhf", *sft_args(tiny_dirs, files, tmp_path / "run")]
    p = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(1.0)  # past the interpreter's start and `import rlhf.cli`, well before the first step
    assert p.poll() is None
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 75, err[-2000:]
    assert "rlhf: got SIGTERM while loading: stopping" in err


def test_a_sigterm_while_loading_whose_exit_python_dropped_stops_at_step_0(
    tiny_dirs, files, tmp_path, capsys, monkeypatch
):
    """Python runs a signal handler wherever the main thread is, finalizers (`__del__`) included, and drops an
    exception raised in a finalizer. CI once saw the loading-time SIGTERM's exit dropped so, the run going on
    to exit 0 under a printed traceback. Now the engine takes the signal up: a checkpoint at step 0, exit 75, no
    traceback, and the same command resumes."""
    handled: list[type[BaseException]] = []

    class Finalized:
        def __del__(self) -> None:
            try:
                sigterm_here()
            except BaseException as exc:
                handled.append(type(exc))
                raise

    other: list[BaseException | None] = []
    monkeypatch.setattr(sys, "unraisablehook", lambda info: other.append(info.exc_value))
    while_loading(monkeypatch, Finalized)  # collected at once: the exit raised in its __del__ goes no further
    out = tmp_path / "run"
    assert sft(tiny_dirs, files, out, "--train.max_steps=3") == 75
    err = capsys.readouterr().err
    assert handled == [SystemExit] and other == []  # dropped, and quietly
    assert "rlhf: got SIGTERM while loading: stopping" in err and "rlhf: interrupted at step 0; checkpoint" in err
    assert "Traceback" not in err and "Exception ignored" not in err
    assert not (out / "metrics.jsonl").exists() or not read_jsonl(out / "metrics.jsonl")
    monkeypatch.undo()
    assert sft(tiny_dirs, files, out, "--train.max_steps=3") == 0
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl")] == [1, 2, 3] and (out / "final").is_dir()


def test_other_unraisable_exceptions_still_reach_the_hook_while_loading(monkeypatch):
    """The loading-time quiet hook keeps only our own dropped exit from `sys.unraisablehook`."""
    from rlhf.runtime.signals import stop_while_loading

    seen: list[type[BaseException]] = []

    def hook(info: Any) -> None:
        seen.append(info.exc_type)

    monkeypatch.setattr(sys, "unraisablehook", hook)

    class Failing:
        def __del__(self) -> None:
            raise ValueError("not ours")

    with stop_while_loading():
        Failing()
    assert seen == [ValueError] and sys.unraisablehook is hook  # passed on, and the hook put back


def test_a_sigterm_while_loading_that_a_library_turns_into_another_error_still_stops(
    tiny_dirs, files, tmp_path, capsys, monkeypatch
):
    """Code the loading-time exit lands in may turn it into another error: CI's stress runs saw `transformers`'
    lazy import report it as "ModuleNotFoundError: Could not import module 'PreTrainedModel'", a traceback and
    exit 1. It is the stop that was asked for: exit 75, one line."""

    def lazy_import() -> None:
        try:
            sigterm_here()
        except SystemExit as exc:
            raise ModuleNotFoundError("Could not import module 'PreTrainedModel'") from exc

    while_loading(monkeypatch, lazy_import)
    assert sft(tiny_dirs, files, tmp_path / "run", "--train.max_steps=3") == 75
    err = capsys.readouterr().err
    assert err.strip() == "rlhf: got SIGTERM while loading: stopping"


def test_a_sigterm_after_the_run_ended_changes_nothing(tiny_dirs, files, tmp_path, capsys, monkeypatch):
    """Between the engine's end and the command's return the loading-time handler is back: a SIGTERM there used
    to say "while loading: stopping" and exit 75 for a finished run. Now it is noted and the run ends as it was."""
    import rlhf.trainers.sft as sft_module

    train = sft_module.train

    def train_then_signal(cfg):
        out = train(cfg)
        sigterm_here()
        return out

    monkeypatch.setattr(sft_module, "train", train_then_signal)
    out, before = tmp_path / "run", signal.getsignal(signal.SIGTERM)
    assert sft(tiny_dirs, files, out, "--train.max_steps=2") == 0
    assert "rlhf: got SIGTERM after the run ended; it is saved" in capsys.readouterr().err
    assert (out / "final").is_dir()
    assert signal.getsignal(signal.SIGTERM) == before  # the context put back what was there


def test_a_sigterm_while_the_finished_process_exits_keeps_its_status(tiny_dirs, files, tmp_path):
    """After `main()` returned the process tears down (~1 s with torch loaded before `gc.freeze`); a SIGTERM there
    used to end a finished run with -15 (4 of 5 tries). The `rlhf` process now exits at once with the command's
    status. The child holds its teardown open for 5 s (an exit handler that sleeps), so the signal lands there
    whatever the machine's load (or just before, where the run's end notes it: exit 0 either way)."""
    entry = "import atexit, time; atexit.register(time.sleep, 5); from rlhf.cli import run; run()"
    cmd = [sys.executable, "-c", entry, *sft_args(tiny_dirs, files, tmp_path / "run", "--train.max_steps=2")]
    p = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert p.stdout is not None
    line = p.stdout.readline()  # the command's last line: its work is done
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=60)
    assert line.startswith("rlhf train sft: run directory") and p.returncode == 0, err[-2000:]
    assert (tmp_path / "run" / "final").is_dir()
