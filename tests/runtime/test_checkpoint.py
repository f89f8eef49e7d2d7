"""Checkpoints: round trip, manifest verification, crash-safety of the write, keep_last, refusing NaN weights."""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from _toy import TokenModel, make_engine, split, token_batches, token_loss
from transformers import AutoModelForCausalLM

from rlhf.runtime import checkpoint as ckpt
from rlhf.runtime.data_order import DataOrder
from rlhf.tasks.tiny import build_model, build_tokenizer


class Counter:
    """A registered state that is not plain JSON (a tensor and a tuple), kept per rank."""

    def __init__(self) -> None:
        self.t = torch.zeros(3)
        self.pair = (0, "a")

    def state_dict(self) -> dict:
        return {"t": self.t.clone(), "pair": self.pair}

    def load_state_dict(self, d: dict) -> None:
        self.t, self.pair = d["t"], tuple(d["pair"])


def _train(engine, batches) -> None:
    for b in batches:
        engine.train_step(split(b, 4), token_loss)
        engine.maybe_save_checkpoint()


def _states(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir())


def test_round_trip_restores_everything(tmp_path: Path) -> None:
    batches = token_batches(4)
    with make_engine(TokenModel(), tmp_path, ckpt_every=2) as a:
        order, counter = DataOrder(20, 4, seed=3), Counter()
        a.register_state("data_order", order)
        a.register_state("counter", counter, per_rank=True)
        for _ in range(3):
            order.next_batch()
        counter.t += 5
        counter.pair = (7, "b")
        _train(a, batches[:2])
        files = sorted(p.name for p in (tmp_path / "checkpoints" / "step-2").iterdir())
        expected_rng = ckpt.capture_rng_state()
    assert files == [
        "manifest.json",
        "model.safetensors",
        "optimizer.pt",
        "rng-rank0.pt",
        "scheduler.pt",
        "state-counter-rank0.pt",
        "state-data_order.json",
        "trainer_state.json",
    ]
    random.random(), np.random.rand(), torch.rand(3)  # move every RNG stream on
    with make_engine(TokenModel(seed=9), tmp_path) as b:
        order2, counter2 = DataOrder(20, 4, seed=3), Counter()
        b.register_state("data_order", order2)
        b.register_state("counter", counter2, per_rank=True)
        assert b.resume() is True
        assert b.step == 2 and order2.state_dict() == order.state_dict()
        assert torch.equal(counter2.t, torch.full((3,), 5.0)) and counter2.pair == (7, "b")
        for (k, v), w in zip(
            a.unwrapped_model.state_dict().items(), b.unwrapped_model.state_dict().values(), strict=True
        ):
            assert torch.equal(v, w), k
        sa, sb = a.optimizer.state_dict(), b.optimizer.state_dict()
        assert sa["param_groups"] == sb["param_groups"]
        assert all(torch.equal(sa["state"][i][k], sb["state"][i][k]) for i in sa["state"] for k in sa["state"][i])
        assert b.scheduler.state_dict() == a.scheduler.state_dict()
        assert ckpt.capture_rng_state()["python"] == expected_rng["python"]
        assert torch.equal(ckpt.capture_rng_state()["torch"], expected_rng["torch"])
        assert ckpt.capture_rng_state()["numpy"] == expected_rng["numpy"]


def test_manifest_detects_a_corrupted_byte_and_resume_falls_back(tmp_path: Path, caplog) -> None:
    with make_engine(TokenModel(), tmp_path, ckpt_every=2, keep_last=3) as engine:
        _train(engine, token_batches(4))
    newest = tmp_path / "checkpoints" / "step-4"
    ckpt.verify_checkpoint(newest)
    data = bytearray((newest / "model.safetensors").read_bytes())
    data[len(data) // 2] ^= 0x01
    (newest / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(ckpt.CheckpointError, match="sha256"):
        ckpt.verify_checkpoint(newest)
    with caplog.at_level(logging.WARNING), make_engine(TokenModel(), tmp_path) as engine:
        assert engine.resume() and engine.step == 2
    assert "step-4" in caplog.text
    with (
        make_engine(TokenModel(), tmp_path, resume=str(newest)) as engine,
        pytest.raises(ckpt.CheckpointError, match="corrupted"),
    ):
        engine.resume()


def test_crash_while_writing_leaves_the_previous_checkpoint_chosen(tmp_path: Path, monkeypatch) -> None:
    batches = token_batches(4)
    with make_engine(TokenModel(), tmp_path, ckpt_every=2, keep_last=1) as engine:
        _train(engine, batches[:2])

        def boom(*a, **k):
            raise OSError("disk full")

        monkeypatch.setattr(ckpt, "write_manifest", boom)
        with pytest.raises(OSError, match="disk full"):
            _train(engine, batches[2:])
    monkeypatch.undo()
    # the failed step-4 write removed its temporary directory; keep_last=1 deleted nothing
    assert _states(tmp_path) == ["step-2"]
    # what a SIGKILL mid-write leaves (nothing could clean it up), and a step directory without a manifest
    # (e.g. copied by hand, or written by an older non-atomic tool)
    (tmp_path / "checkpoints" / ".tmp-step-4-12345").mkdir()
    (tmp_path / "checkpoints" / "step-6").mkdir()
    (tmp_path / "checkpoints" / "step-6" / "model.safetensors").write_bytes(b"partial")
    with make_engine(TokenModel(), tmp_path, ckpt_every=2, keep_last=1) as engine:
        assert engine.resume() and engine.step == 2
        _train(engine, batches[2:3])
        engine.save_checkpoint()
    # the next save removed the stale temporary and pruned to keep_last=1 complete checkpoint; the step-6
    # directory without a manifest is neither counted nor deleted
    assert _states(tmp_path) == ["step-3", "step-6"]


def test_keep_last_deletes_old_checkpoints_only_after_the_new_one_is_complete(tmp_path: Path, monkeypatch) -> None:
    batches = token_batches(8)
    with make_engine(TokenModel(), tmp_path, ckpt_every=2, keep_last=2) as engine:
        _train(engine, batches[:6])
        assert _states(tmp_path) == ["step-4", "step-6"]
        monkeypatch.setattr(ckpt, "commit_dir", lambda tmp, final: (_ for _ in ()).throw(OSError("rename failed")))
        with pytest.raises(OSError):
            _train(engine, batches[6:8])
        assert [s for s in _states(tmp_path) if s.startswith("step-")] == ["step-4", "step-6"]


def test_checkpoints_by_elapsed_minutes(tmp_path: Path, monkeypatch) -> None:
    """checkpoint.every_minutes: a checkpoint at the first step that ends once that much time passed since the last
    one (or the start), whatever the step count; none before. The clock is the engine's (time.monotonic)."""
    clock = [1000.0]
    monkeypatch.setattr("rlhf.runtime.engine.time.monotonic", lambda: clock[0])
    batches = token_batches(6)
    with make_engine(TokenModel(), tmp_path, ckpt_every_minutes=2.0, keep_last=5) as engine:
        _train(engine, batches[:2])  # 0 s passed
        assert not (tmp_path / "checkpoints").exists()
        clock[0] += 119.0
        _train(engine, batches[2:3])  # step 3: 119 s
        assert not (tmp_path / "checkpoints").exists()
        clock[0] += 1.0
        _train(engine, batches[3:5])  # step 4 at 120 s: due; step 5: 0 s since it
        assert _states(tmp_path) == ["step-4"]
        clock[0] += 120.0
        _train(engine, batches[5:6])
        assert _states(tmp_path) == ["step-4", "step-6"]


def test_a_nonfinite_weight_is_never_checkpointed(tmp_path: Path) -> None:
    with make_engine(TokenModel(), tmp_path) as engine:
        with torch.no_grad():
            engine.unwrapped_model.head.bias[0] = float("nan")
        with pytest.raises(ckpt.CheckpointError, match="head.bias"):
            engine.save_checkpoint()
    assert not (tmp_path / "checkpoints").exists() or _states(tmp_path) == []


def test_resume_never_and_explicit_path(tmp_path: Path) -> None:
    with make_engine(TokenModel(), tmp_path / "a", ckpt_every=2, keep_last=0) as engine:
        _train(engine, token_batches(4))
    with make_engine(TokenModel(), tmp_path / "a", resume="never") as engine:
        assert engine.resume() is False and engine.step == 0
    with make_engine(TokenModel(), tmp_path / "b", resume=str(tmp_path / "a" / "checkpoints" / "step-2")) as engine:
        assert engine.resume() and engine.step == 2
    with make_engine(TokenModel(), tmp_path / "c", resume=str(tmp_path / "a" / "checkpoints")) as engine:
        assert engine.resume() and engine.step == 4
    with (
        make_engine(TokenModel(), tmp_path / "d", resume=str(tmp_path / "nope")) as engine,
        pytest.raises(ckpt.CheckpointError, match="does not exist"),
    ):
        engine.resume()


def test_tied_weights_round_trip_and_save_final(tmp_path: Path) -> None:
    tokenizer = build_tokenizer("gpt2")
    model = build_model(tokenizer, "gpt2", hidden_size=32, num_layers=1, num_heads=2, max_positions=32)
    assert model.lm_head.weight is model.transformer.wte.weight
    batch = {"input_ids": torch.randint(7, len(tokenizer), (4, 8), generator=torch.Generator().manual_seed(0))}

    def lm_loss(m, b):
        out = m(input_ids=b["input_ids"], labels=b["input_ids"])
        return out.loss * 7 * 4, torch.tensor(28.0), {}

    with make_engine(model, tmp_path, batch_size=4, micro_batch_size=4) as engine:
        engine.train_step([batch], lm_loss)
        engine.save_checkpoint()
        final = engine.save_final(engine.unwrapped_model, tokenizer)
        trained = {k: v.clone() for k, v in engine.unwrapped_model.state_dict().items()}
    with make_engine(
        build_model(tokenizer, "gpt2", hidden_size=32, num_layers=1, num_heads=2, max_positions=32, seed=5), tmp_path
    ) as engine:
        engine.resume()
        restored = engine.unwrapped_model
        assert restored.lm_head.weight is restored.transformer.wte.weight
        assert all(torch.equal(v, trained[k]) for k, v in restored.state_dict().items())
    loaded = AutoModelForCausalLM.from_pretrained(final)
    assert all(torch.equal(v, trained[k]) for k, v in loaded.state_dict().items())
    assert (final / "model.safetensors").is_file() and (final / "tokenizer_config.json").is_file()
    assert not list(tmp_path.glob(".tmp-*"))


def test_save_final_refuses_nonfinite_weights(tmp_path: Path) -> None:
    tokenizer = build_tokenizer("llama")
    model = build_model(tokenizer, "llama", hidden_size=32, num_layers=1, max_positions=32)
    with make_engine(model, tmp_path) as engine:
        with torch.no_grad():
            model.lm_head.weight[0, 0] = float("inf")
        with pytest.raises(ckpt.CheckpointError, match="lm_head.weight"):
            engine.save_final(model, tokenizer)
    assert not (tmp_path / "final").exists()


def test_every_saved_file_is_json_or_weights_only(tmp_path: Path) -> None:
    with make_engine(TokenModel(), tmp_path) as engine:
        engine.register_state("counter", Counter())
        engine.train_step(split(token_batches(1)[0], 8), token_loss)
        path = engine.save_checkpoint()
    for p in path.iterdir():
        if p.suffix == ".pt":
            torch.load(p, weights_only=True)
        elif p.suffix == ".json":
            json.loads(p.read_text())
        else:
            assert p.suffix == ".safetensors"
