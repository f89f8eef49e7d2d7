"""The reference log-prob cache: it trains like the live reference, it is reused, and a stale one is never read.

The cache lives in run_dir/ref_logps/<key>.safetensors; the key covers the reference weights, the data files,
the tokenization settings and the tokenizer (see rlhf.models.reference).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from _dpo_helpers import (
    examples,
    load_model,
    make_config,
    metrics,
    pair_logps,
    task_files,
    tokenizer_of,
)
from safetensors.torch import load_file

from rlhf.models import reference as pl
from rlhf.tasks.sorting import preference_rows
from rlhf.tasks.tiny import make_tiny_checkpoint
from rlhf.trainers import dpo


@pytest.fixture()
def setup(tmp_path: Path) -> dict[str, Any]:
    files = task_files(tmp_path / "data", n_train=48, n_eval=16)
    policy = make_tiny_checkpoint(tmp_path / "policy", "llama", hidden_size=32, seed=3)
    ref = make_tiny_checkpoint(tmp_path / "ref", "llama", hidden_size=32, seed=4)
    return {"files": files, "policy": policy, "ref": ref, "root": tmp_path}


def config(setup: dict[str, Any], run_dir: Path, **values: Any) -> dpo.Config:
    return make_config(
        dpo,
        output_dir=run_dir,
        **{
            "model.path": setup["policy"],
            "ref.path": setup["ref"],
            "data.train": setup["files"]["preference"],
            "data.eval": setup["files"]["preference_eval"],
            "train.batch_size": 8,
            "train.micro_batch_size": 4,
            "train.max_steps": 10,
            "train.eval_every": 5,
            "optim.lr": 1e-3,
            **values,
        },
    )


def cache_files(run_dir: Path) -> list[Path]:
    return sorted((run_dir / "ref_logps").iterdir())


def assert_table_is_the_reference(table: dict[str, torch.Tensor], ref_dir: Path, files: dict[str, Path]) -> None:
    """Every cached row equals the reference's log-probs computed independently (unpadded, one row at a time)."""
    ref, tok = load_model(ref_dir), tokenizer_of(ref_dir)
    for split, path in (("train", files["preference"]), ("eval", files["preference_eval"])):
        want = pair_logps(ref, examples(path, "preference", tok))
        torch.testing.assert_close(
            table[split].double(), torch.stack([want["chosen"], want["rejected"]], 1), atol=2e-5, rtol=1e-5
        )


def test_training_with_the_cache_equals_training_with_the_live_reference(setup: dict[str, Any]) -> None:
    live = dpo.train(config(setup, setup["root"] / "live"))
    cached = dpo.train(config(setup, setup["root"] / "cached", precompute_ref=True))
    assert not (live / "ref_logps").exists()
    (cache,) = cache_files(cached)
    assert cache.suffix == ".safetensors"
    table = load_file(cache)
    assert table["train"].shape == (48, 2) and table["eval"].shape == (16, 2)
    assert_table_is_the_reference(table, setup["ref"], setup["files"])

    w_live, w_cached = (
        load_file(live / "final" / "model.safetensors"),
        load_file(cached / "final" / "model.safetensors"),
    )
    assert w_live.keys() == w_cached.keys()
    for k in w_live:
        torch.testing.assert_close(w_cached[k], w_live[k], atol=1e-5, rtol=1e-4, msg=k)
    m_live, m_cached = metrics(live), metrics(cached)
    assert [m.keys() for m in m_live] == [m.keys() for m in m_cached]
    for a, b in zip(m_live, m_cached, strict=True):
        for k in a:
            assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-5), k


def test_the_cache_is_reused_and_a_stale_one_is_recomputed(
    setup: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    run_dir = setup["root"] / "run"
    cfg = config(setup, run_dir, precompute_ref=True, **{"train.max_steps": 2})
    dpo.train(cfg)
    (first,) = cache_files(run_dir)

    # The same run again: a hit, so the reference model is neither loaded nor run.
    with monkeypatch.context() as m:
        real_load = dpo.load_causal_lm
        m.setattr(dpo, "load_causal_lm", lambda c, *, trainable=True: _policy_only(real_load, c, trainable))
        m.setattr(pl, "score_examples", _refuse)
        dpo.train(cfg)
    assert cache_files(run_dir) == [first]

    # Changed data (one more pair): a new key, scored afresh.
    rows = preference_rows(49, seed=0)
    setup["files"]["preference"].write_text("".join(__import__("json").dumps(r) + "\n" for r in rows))
    dpo.train(cfg)
    second = [p for p in cache_files(run_dir) if p != first]
    assert len(second) == 1
    table = load_file(second[0])
    assert table["train"].shape == (49, 2)
    assert_table_is_the_reference(table, setup["ref"], setup["files"])

    # Changed reference weights (same path, same data): a new key again, with the new reference's numbers.
    shutil.rmtree(setup["ref"])
    make_tiny_checkpoint(setup["ref"], "llama", hidden_size=32, seed=5)
    dpo.train(cfg)
    third = [p for p in cache_files(run_dir) if p not in (first, *second)]
    assert len(third) == 1
    assert_table_is_the_reference(load_file(third[0]), setup["ref"], setup["files"])


def test_the_key_changes_with_tokenization_settings_and_tokenizer(setup: dict[str, Any]) -> None:
    cfg = config(setup, setup["root"] / "k", precompute_ref=True)
    tok = tokenizer_of(setup["policy"])
    splits = {"train": examples(setup["files"]["preference"], "preference", tok)}
    layout = pl.ExampleLayout("preference", ("prompt_ids", "chosen_ids", "rejected_ids"), lambda x: x, 2)
    key = pl.reference_cache_key(cfg, splits, layout)
    assert pl.reference_cache_key(cfg, splits, layout) == key
    shorter = config(setup, setup["root"] / "k", precompute_ref=True, **{"data.max_length": 40})
    assert pl.reference_cache_key(shorter, splits, layout) != key
    other_tok = make_tiny_checkpoint(setup["root"] / "gpt2", "gpt2", hidden_size=32)
    with_tok = config(setup, setup["root"] / "k", precompute_ref=True, **{"model.tokenizer": other_tok})
    assert pl.reference_cache_key(with_tok, splits, layout) != key
    bf16 = config(setup, setup["root"] / "k", precompute_ref=True, **{"ref.dtype": "bfloat16"})
    assert pl.reference_cache_key(bf16, splits, layout) != key
    fewer = {"train": splits["train"][:-1]}
    assert pl.reference_cache_key(cfg, fewer, layout) != key


def _policy_only(load: Any, model_cfg: Any, trainable: bool) -> Any:
    if not trainable:
        raise AssertionError("the reference model was loaded despite a cache hit")
    return load(model_cfg, trainable=trainable)


def _refuse(*_: Any, **__: Any) -> Any:
    raise AssertionError("reference log-probs were recomputed despite a cache hit")


def test_the_reference_pass_and_each_evaluation_draw_a_bar_only_where_progress_is_on(
    setup: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    """The reference log-probs pass and the evaluations show transient bars on stderr with logging.progress on
    (the main process's), and none with it off."""
    for shown in (True, False):
        run = setup["root"] / f"progress-{shown}"
        dpo.train(config(setup, run, precompute_ref=True, **{"logging.progress": shown}))
        err = capsys.readouterr().err
        assert ("reference log-probs:" in err) == shown and ("eval:" in err) == shown, err
