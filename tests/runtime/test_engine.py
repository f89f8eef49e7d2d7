"""The step engine: exact accumulation, the non-finite guard, the LR schedule, metrics, multi-process equality."""

from __future__ import annotations

import copy
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _resume import accelerate_launch, last_logged_step, wait_for_step
from _toy import TokenModel, make_engine, split, token_batches, token_loss
from safetensors.torch import load_file

from rlhf.config import ScheduleConfig
from rlhf.errors import UserError
from rlhf.runtime import checkpoint as ckpt
from rlhf.runtime.engine import NonFiniteError, lr_factor
from rlhf.tasks.tiny import build_model, build_tokenizer

TOY = Path(__file__).parents[1] / "support" / "_toy.py"


def _run(engine, batches, micro: int, loss_fn=token_loss) -> list[dict | None]:
    return [engine.train_step(split(b, micro), loss_fn) for b in batches]


def _plain_loop(batches, steps_lr: float, max_norm: float, weight_decay: float) -> TokenModel:
    """The reference: full-batch token-mean loss, torch AdamW, clip_grad_norm_ (no engine involved)."""
    model = TokenModel()
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=steps_lr
    )
    for b in batches:
        loss_sum, units, _ = token_loss(model, b)
        (loss_sum / units).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        opt.step()
        opt.zero_grad()
    return model


def test_accumulation_4x2_equals_1x8_and_the_plain_full_batch_loop(tmp_path: Path) -> None:
    batches = token_batches(3)
    assert len({int(m.sum()) for m in (split(batches[0], 2)[i]["mask"] for i in range(4))}) > 1  # unequal tokens
    with make_engine(TokenModel(), tmp_path / "a", micro_batch_size=2) as a:
        _run(a, batches, 2)
    with make_engine(TokenModel(), tmp_path / "b", micro_batch_size=8) as b:
        _run(b, batches, 8)
    ref = _plain_loop(batches, 1e-2, 1.0, 0.1)
    for (name, pa), pb, pr in zip(
        a.unwrapped_model.named_parameters(), b.unwrapped_model.parameters(), ref.parameters(), strict=True
    ):
        torch.testing.assert_close(pa, pb, atol=1e-6, rtol=1e-5, msg=name)
        torch.testing.assert_close(pa, pr, atol=1e-6, rtol=1e-5, msg=name)


def test_the_naive_mean_of_micro_batch_means_would_differ() -> None:
    """Guards the test above: with these token counts the naive accumulation gives a visibly different gradient."""
    batch = token_batches(1)[0]
    full, naive = TokenModel(), TokenModel()
    loss_sum, units, _ = token_loss(full, batch)
    (loss_sum / units).backward()
    for mb in split(batch, 2):
        s, u, _ = token_loss(naive, mb)
        (s / u / 4).backward()
    diff = max((p.grad - q.grad).abs().max().item() for p, q in zip(full.parameters(), naive.parameters(), strict=True))
    assert diff > 1e-3


def test_metrics_are_unit_weighted_and_loss_is_global_token_mean(tmp_path: Path) -> None:
    batch = token_batches(1)[0]
    mbs = split(batch, 2)
    calls = iter(range(len(mbs)))

    def loss_fn(model, mb):
        loss_sum, units, _ = token_loss(model, mb)
        value = 2.0 if next(calls) % 2 == 0 else 4.0  # a per-unit metric of 2 or 4, reported as a sum
        return loss_sum, units, {"x/metric": units * value}

    with make_engine(TokenModel(), tmp_path, micro_batch_size=2) as engine:
        expected_loss = (token_loss(engine.model, batch)[0] / batch["mask"].sum()).item()
        m = engine.train_step(mbs, loss_fn)
    units = [mb["mask"].sum().item() for mb in mbs]
    assert m["train/units"] == sum(units)
    weighted = sum(u * (2.0 if i % 2 == 0 else 4.0) for i, u in enumerate(units))
    assert m["x/metric"] == pytest.approx(weighted / sum(units))
    assert m["train/loss"] == pytest.approx(expected_loss, rel=1e-6)
    assert m["train/nonfinite_skips"] == 0.0 and m["train/lr"] == 1e-2


def _snapshot(engine) -> tuple[dict, dict, float, int]:
    weights = {k: v.clone() for k, v in engine.unwrapped_model.state_dict().items()}
    return (
        weights,
        copy.deepcopy(engine.optimizer.state_dict()),
        engine.scheduler.get_last_lr()[0],
        engine.scheduler.last_epoch,
    )


def _assert_same(before, engine) -> None:
    weights, opt, lr, last_epoch = before
    for k, v in engine.unwrapped_model.state_dict().items():
        assert torch.equal(v, weights[k]), k
    now = engine.optimizer.state_dict()
    assert now["param_groups"] == opt["param_groups"]
    for idx, st in opt["state"].items():
        for key, t in st.items():
            assert torch.equal(now["state"][idx][key], t), (idx, key)
    assert engine.scheduler.get_last_lr()[0] == lr and engine.scheduler.last_epoch == last_epoch


def _nan_loss(model, mb):
    loss_sum, units, metrics = token_loss(model, mb)
    return loss_sum * float("nan"), units, metrics


def _inf_grad_loss(model, mb):
    """A finite loss (0) whose gradient is inf: d sqrt(x)/dx at x = 0."""
    loss_sum, units, metrics = token_loss(model, mb)
    w = model.head.bias
    return loss_sum + torch.sqrt(w - w.detach()).sum(), units, metrics


@pytest.mark.parametrize("bad_loss", [_nan_loss, _inf_grad_loss], ids=["nan-loss", "inf-grad"])
def test_nonfinite_step_is_skipped_without_touching_weights_optimizer_or_schedule(tmp_path: Path, bad_loss) -> None:
    batches = token_batches(4)
    with make_engine(TokenModel(), tmp_path, schedule="cosine", warmup_steps=1, total_steps=10) as engine:
        _run(engine, batches[:2], 4)
        before = _snapshot(engine)
        m = engine.train_step(split(batches[2], 4), bad_loss)
        _assert_same(before, engine)
        assert all(p.grad is None for p in engine.model.parameters())
        assert engine.step == 3 and engine.nonfinite_skips == 1 and engine.consecutive_nonfinite == 1
        assert m["train/nonfinite_skips"] == 1.0 and not math.isfinite(m["train/grad_norm"])
        m = engine.train_step(split(batches[3], 4), token_loss)
        assert engine.consecutive_nonfinite == 0 and math.isfinite(m["train/loss"])
        assert engine.scheduler.last_epoch == 3  # the schedule counts applied updates: 3 of 4 steps


def test_consecutive_nonfinite_steps_raise_a_clear_error(tmp_path: Path) -> None:
    batch = token_batches(1)[0]
    with make_engine(TokenModel(), tmp_path, max_consecutive_nonfinite=3) as engine:
        engine.train_step(split(batch, 8), _nan_loss)
        engine.train_step(split(batch, 8), _nan_loss)
        with pytest.raises(NonFiniteError, match=r"3 optimizer steps in a row.*Lower optim\.lr"):
            engine.train_step(split(batch, 8), _nan_loss)


def test_zero_unit_step_is_a_zero_gradient_not_a_skip(tmp_path: Path) -> None:
    batch = token_batches(1)[0]
    batch["mask"].zero_()
    with make_engine(TokenModel(), tmp_path) as engine:
        m = engine.train_step(split(batch, 8), token_loss)
    assert m["train/loss"] == 0.0 and m["train/grad_norm"] == 0.0 and engine.nonfinite_skips == 0


def test_lr_factor_hand_computed() -> None:
    """warmup 2, total 10, min 0.1: steps 0,1 -> 0, 1/2; then p = (s - 2) / 8.
    cosine s=6: p = 1/2 -> 0.1 + 0.9 * 0.5 * (1 + cos(pi/2)) = 0.55; s=4: p = 1/4 -> 0.1 + 0.45 (1 + 0.70711) = 0.86820
    linear s=4: 0.1 + 0.9 * 0.75 = 0.775; s >= 10: 0.1. constant: 1 after warmup."""

    def f(name: str, s: int) -> float:
        return lr_factor(s, ScheduleConfig(name=name, warmup_steps=2, min_lr_ratio=0.1), 10)

    cos = [f("cosine", s) for s in range(12)]
    assert cos[:3] == [0.0, 0.5, 1.0]
    assert cos[6] == pytest.approx(0.55) and cos[4] == pytest.approx(0.868198, abs=1e-6)
    assert cos[10] == pytest.approx(0.1) and cos[11] == pytest.approx(0.1)
    assert f("linear", 4) == pytest.approx(0.775)
    assert [f("constant", s) for s in (0, 1, 2, 9)] == [0.0, 0.5, 1.0, 1.0]


@pytest.mark.parametrize(
    ("name", "m", "theirs", "kwargs"),
    [
        ("constant", 0.0, "constant_with_warmup", {}),
        ("linear", 0.0, "linear", {}),
        ("cosine", 0.0, "cosine", {}),
        ("cosine", 0.2, "cosine_with_min_lr", {"min_lr_rate": 0.2}),
    ],
)
def test_lr_factor_is_transformers_schedule_where_it_has_one(name: str, m: float, theirs: str, kwargs: dict) -> None:
    """Where transformers.get_scheduler has the curve, ours is the same at every step up to the horizon."""
    from transformers import get_scheduler

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = get_scheduler(theirs, opt, num_warmup_steps=3, num_training_steps=11, scheduler_specific_kwargs=kwargs)
    want = [sched.lr_lambdas[0](s) for s in range(12)]
    got = [lr_factor(s, ScheduleConfig(name=name, warmup_steps=3, min_lr_ratio=m), 11) for s in range(12)]
    assert got == pytest.approx(want, abs=1e-12)


def test_engine_applies_the_schedule_step_by_step(tmp_path: Path) -> None:
    batches = token_batches(7)
    with make_engine(
        TokenModel(), tmp_path, lr=2.0, schedule="cosine", warmup_steps=2, total_steps=6, min_lr_ratio=0.0
    ) as engine:
        lrs = [m["train/lr"] for m in _run(engine, batches, 8)]
    # peak 2: warmup 0, 1; then cosine over 4 steps: 2 * 0.5 (1 + cos(pi k / 4)), k = 0..3; then 0
    expected = [0.0, 1.0, 2.0, 1 + math.cos(math.pi / 4), 1.0, 1 - math.cos(math.pi / 4), 0.0]
    assert lrs == pytest.approx(expected)


def test_param_groups_exclude_biases_and_norms_from_weight_decay(tmp_path: Path) -> None:
    with make_engine(TokenModel(), tmp_path, weight_decay=0.1) as engine:
        groups = engine.optimizer.param_groups
    model = engine.unwrapped_model
    decayed = {id(p) for g in groups if g["weight_decay"] == 0.1 for p in g["params"]}
    assert decayed == {id(model.embed.weight), id(model.head.weight)}


def test_logging_every_and_files(tmp_path: Path) -> None:
    batches = token_batches(4)
    with make_engine(TokenModel(), tmp_path, log_every=2, config_dict={"a": {"b": 1}}) as engine:
        out = []
        for b in batches:
            out.append(engine.train_step(split(b, 8), token_loss))
            if out[-1] is not None:
                engine.log(out[-1])
        assert [m is None for m in out] == [True, False, True, False]
        engine.log({"extra/x": 1.5, "perf/y": 3.0}, step=7)
    metrics = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    perf = [json.loads(line) for line in (tmp_path / "perf.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [2, 4, 7] and metrics[2] == {"step": 7, "extra/x": 1.5}
    assert not any(k.startswith("perf/") for m in metrics for k in m)
    assert [p["step"] for p in perf] == [2, 4, 7] and "perf/samples_per_s" in perf[0]
    assert (tmp_path / "config.yaml").read_text() == "a:\n  b: 1\n"


def test_the_last_step_logs_whatever_the_interval(tmp_path: Path) -> None:
    """A run of 5 steps logging every 2 logs steps 2 and 4, and its last (5): a run shorter than the interval still
    writes its metrics."""
    with make_engine(TokenModel(), tmp_path, log_every=2, total_steps=5) as engine:
        out = [engine.train_step(split(b, 8), token_loss) for b in token_batches(5)]
    assert [m is not None for m in out] == [False, True, False, True, True]


def test_micro_batches_and_local_indices(tmp_path: Path) -> None:
    with make_engine(TokenModel(), tmp_path, batch_size=8, micro_batch_size=2) as engine:
        assert engine.micro_batches_per_step() == 4
        assert engine.local_indices(list(range(10, 18))) == [[10, 11], [12, 13], [14, 15], [16, 17]]
        engine.world_size, engine.rank = 2, 1  # the sharding arithmetic of process 1 of 2
        assert engine.micro_batches_per_step() == 2
        assert engine.local_indices(list(range(10, 18))) == [[11, 13], [15, 17]]
        engine.train_cfg.micro_batch_size = 3
        with pytest.raises(ValueError, match="multiple"):
            engine.micro_batches_per_step()
        engine.world_size, engine.rank = 1, 0


def test_local_indices_group_examples_of_like_length(tmp_path: Path) -> None:
    """With the examples' lengths, a batch that is split is cut longest first (ties in draw order): each micro-batch
    holds like lengths, and the processes' shares together are the batch; a batch that is one micro-batch on one
    process keeps its draw order."""
    lengths = {10: 5, 11: 30, 12: 7, 13: 30, 14: 1, 15: 12, 16: 9, 17: 40}
    with make_engine(TokenModel(), tmp_path, batch_size=8, micro_batch_size=2) as engine:
        batch = list(range(10, 18))
        assert engine.local_indices(batch, lengths) == [[17, 11], [13, 15], [16, 12], [10, 14]]
        padded = sum(len(mb) * max(lengths[i] for i in mb) for mb in engine.local_indices(batch, lengths))
        assert (
            padded
            == 2 * (40 + 30 + 9 + 5)
            < sum(len(mb) * max(lengths[i] for i in mb) for mb in engine.local_indices(batch))
        )
        engine.train_cfg.micro_batch_size = 8
        assert engine.local_indices(batch, lengths) == [batch]
        engine.world_size = 2
        shares = []
        for engine.rank in (0, 1):
            shares.append(engine.local_indices(batch, lengths))
        assert shares == [[[17, 13, 16, 10]], [[11, 15, 12, 14]]]
        assert sorted(i for share in shares for mb in share for i in mb) == batch
        engine.world_size, engine.rank = 1, 0


MP_ARGS = ["--steps", "6", "--batch-size", "8", "--micro-batch-size", "4", "--ckpt-every", "2"]


def _env(tmp: Path) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "HF_HOME": str(tmp / "hf")}


def _launch(run_dir: Path, *extra: str) -> subprocess.Popen:
    """`accelerate launch` of the toy on 2 CPU processes (gloo)."""
    cmd = [*accelerate_launch(2), str(TOY), "--run-dir", str(run_dir), *MP_ARGS, *extra]
    return subprocess.Popen(cmd, env=_env(run_dir), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _lines(run_dir: Path) -> list[str]:
    return (run_dir / "metrics.jsonl").read_text().splitlines()


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("two")
    p = _launch(run_dir)
    _, err = p.communicate(timeout=180)
    assert p.returncode == 0, err[-3000:]
    assert json.loads((run_dir / "world.json").read_text()) == {"world_size": 2}
    return run_dir


def test_two_processes_match_one_process(tmp_path: Path, two_process_run: Path) -> None:
    """(e) 2 processes x micro 4 x accum 1 == 1 process x micro 4 x accum 2 (same global batch of 8)."""
    cmd = [sys.executable, str(TOY), "--run-dir", str(tmp_path), *MP_ARGS]
    one = subprocess.run(cmd, env=_env(tmp_path), capture_output=True, text=True, timeout=120)
    assert one.returncode == 0, one.stderr[-3000:]
    a = load_file(tmp_path / "final" / "model.safetensors")
    b = load_file(two_process_run / "final" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=0, msg=k)
    lines = [[json.loads(x) for x in _lines(d)] for d in (tmp_path, two_process_run)]
    assert [m["train/units"] for m in lines[0]] == [m["train/units"] for m in lines[1]]
    assert [m["train/loss"] for m in lines[0]] == pytest.approx([m["train/loss"] for m in lines[1]], rel=1e-5)
    assert [m["toy/rng"] for m in lines[0]] == [m["toy/rng"] for m in lines[1]]
    initial = build_model(build_tokenizer("llama"), "llama", hidden_size=32, max_positions=64, seed=1).state_dict()
    assert not torch.equal(initial["lm_head.weight"], a["lm_head.weight"])  # it trained


def test_two_processes_sigterm_then_resume_is_bit_identical(tmp_path: Path, two_process_run: Path) -> None:
    """SIGTERM to the launcher: both ranks agree on the stop step (the flag rides on the step's all-reduce),
    checkpoint with one RNG file per rank, and a 2-process resume reproduces the uninterrupted run exactly.
    The launcher itself exits 1 (torchrun's SignalException), not 75; the workers exit 75."""
    p = _launch(tmp_path, "--step-sleep", "0.3")
    wait_for_step(p, tmp_path, 2)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=120)
    stopped_at = last_logged_step(tmp_path / "metrics.jsonl")
    assert f"interrupted at step {stopped_at}" in err, err[-3000:]
    path = tmp_path / "checkpoints" / f"step-{stopped_at}"
    ckpt.verify_checkpoint(path)
    assert (path / "rng-rank0.pt").is_file() and (path / "rng-rank1.pt").is_file()
    p = _launch(tmp_path)
    out, err = p.communicate(timeout=180)
    assert p.returncode == 0, err[-3000:]
    assert f"resumed at step {stopped_at}" in out
    a = load_file(tmp_path / "final" / "model.safetensors")
    b = load_file(two_process_run / "final" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a) and a.keys() == b.keys()
    assert (tmp_path / "metrics.jsonl").read_bytes() == (two_process_run / "metrics.jsonl").read_bytes()


def test_fresh_start_drops_step_zero_lines_of_a_run_killed_before_its_first_checkpoint(tmp_path: Path) -> None:
    """A killed run's step-0 line (e.g. a data summary) must not appear twice when the run starts over."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text('{"step": 0, "data/rows": 1.0}\n{"step": 1, "train/loss": 2.0}\n')
    engine = make_engine(TokenModel(), run_dir)
    assert engine.resume() is False  # no checkpoint: a fresh start
    engine.log({"data/rows": 1.0}, step=0)
    engine.close()
    assert [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()] == [
        {"step": 0, "data/rows": 1.0}
    ]


@pytest.mark.parametrize("flag", ["ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED"])
def test_a_launch_that_asks_for_sharding_is_refused_before_anything_starts(tmp_path, monkeypatch, flag):
    """`accelerate launch --use_fsdp` / `--use_deepspeed` (or an accelerate config saying so): not supported yet,
    and on a machine without GPUs accelerate would quietly run DDP instead; one message naming the way out."""
    name = "FSDP" if "FSDP" in flag else "DeepSpeed"
    monkeypatch.setenv(flag, "true")
    with pytest.raises(UserError, match=f"the launch asks for {name}, which rlhf does not support yet.*--multi_gpu"):
        make_engine(TokenModel(), tmp_path)


def test_the_engine_notes_bf16_autocast_on_its_model(tmp_path: Path) -> None:
    """`accelerate` enters autocast inside the prepared model's forward, after a padding-free layout was built for
    it; the engine notes the precision on the model, so such layouts fill their rows on the CPU (`row_multiple`)."""
    from accelerate.state import AcceleratorState

    from rlhf.models import padding_free

    cpu = torch.device("cpu")
    AcceleratorState._reset_state(reset_partial_state=True)  # the process's accelerate state is fixed once made
    try:
        plain, mixed = TokenModel(), TokenModel()
        with make_engine(plain, tmp_path / "fp32"):  # closed: its signal handlers put back
            assert padding_free.row_multiple(plain, cpu) == 1
        AcceleratorState._reset_state(reset_partial_state=True)
        with make_engine(mixed, tmp_path / "bf16", mixed_precision="bf16") as engine:
            assert engine.accelerator.mixed_precision == "bf16"
            assert padding_free.row_multiple(mixed, cpu) == padding_free.ROW_MULTIPLE
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
