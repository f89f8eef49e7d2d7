"""rlhf train sft: it learns the built-in task, packing keeps examples apart, final/ is a plain HF checkpoint."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from rlhf.config import DataConfig, load_config
from rlhf.data import IGNORE_INDEX, load_records, pack_sft, tokenize_records
from rlhf.losses.sft import sft_loss
from rlhf.models import padding_free
from rlhf.models.loading import load_tokenizer
from rlhf.tasks.sorting import write_task_files
from rlhf.trainers import sft

DATA = DataConfig(max_length=64, max_prompt_length=32)


@pytest.fixture(scope="module")
def task(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_task_files(tmp_path_factory.mktemp("task"), n_train=512, n_eval=64)


def make_cfg(model: str, task: dict[str, Path], out: Path, **overrides: object) -> sft.Config:
    values = {
        "output_dir": str(out),
        "model.path": model,
        "data.train": str(task["sft"]),
        "data.eval": str(task["sft_eval"]),
        "data.max_length": 64,
        "data.max_prompt_length": 32,
        "optim.lr": 3e-3,
        "train.batch_size": 16,
        "train.micro_batch_size": 8,
        "train.max_steps": 100,
        "train.eval_every": 50,
        "logging.every": 10,
        "logging.progress": False,
        "checkpoint.resume": "never",
        **overrides,
    }
    return load_config(sft.Config, None, [f"--{k}={v}" for k, v in values.items()])


def examples(tokenizer_dir: str, path: Path, n: int) -> list[dict]:
    records, _ = load_records(path, "sft")
    return tokenize_records(records[:n], "sft", load_tokenizer(tokenizer_dir), DATA)[0]


def eval_loss(model: torch.nn.Module, exs: list[dict], pad_id: int) -> float:
    """Token-mean NLL of `exs`, computed with full logits (no logits_to_keep) and the plain shift."""
    nll_sum, n = 0.0, 0.0
    with torch.no_grad():
        for i in range(0, len(exs), 16):
            b = sft.make_batch(exs[i : i + 16], pad_id)
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
            nll, mask = sft_loss(logits[:, :-1], b["labels"][:, 1:])
            nll_sum, n = nll_sum + nll.sum().item(), n + mask.sum().item()
    return nll_sum / n


def test_sft_learns_the_sorting_task_and_final_loads(tiny_dirs: dict[str, str], task: dict, tmp_path: Path) -> None:
    """(a) 100 steps of 16 on a hidden-32 llama: held-out loss from ~5.6 (ln 263, uniform) to under half of
    that (measured: 5.59 -> 1.37). final/ loads with AutoModelForCausalLM and reproduces the logged eval/loss."""
    base = tiny_dirs["llama"]
    tok = load_tokenizer(base)
    held_out = examples(base, task["sft_eval"], 64)
    init = eval_loss(AutoModelForCausalLM.from_pretrained(base), held_out, tok.pad_token_id)
    run = sft.train(make_cfg(base, task, tmp_path / "run"))
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [line for line in lines if "eval/loss" in line]
    assert [line["step"] for line in evals] == [50, 100]
    final = evals[-1]["eval/loss"]
    assert init > 5.0 and final < 0.5 * init, (init, final)
    assert evals[-1]["eval/perplexity"] == pytest.approx(torch.tensor(final).exp().item())
    losses = [line["train/loss"] for line in lines if "train/loss" in line]
    assert losses[-1] < 0.5 * losses[0]
    assert lines[0]["data/train_rows"] == 512 and lines[0]["data/eval_rows"] == 64
    loaded = AutoModelForCausalLM.from_pretrained(run / "final")  # v5: eval mode
    assert (run / "final" / "model.safetensors").is_file() and (run / "final" / "tokenizer.json").is_file()
    assert eval_loss(loaded, held_out, tok.pad_token_id) == pytest.approx(final, rel=1e-5)


@pytest.mark.parametrize("flat", [False, True], ids=["padded", "padding_free"])
@pytest.mark.parametrize("style", ["llama", "gpt2"])
def test_logits_only_where_labels_are_gives_the_full_loss(
    tiny_dirs: dict[str, str], task: dict, style: str, flat: bool
) -> None:
    """make_batch's logits_to_keep skips the prompt columns (padded) or keeps only the labelled positions
    (padding-free); the NLL sum and token count match full logits of a plain padded batch."""
    model = AutoModelForCausalLM.from_pretrained(tiny_dirs[style])
    exs = examples(tiny_dirs[style], task["sft"], 8)
    pad_id = load_tokenizer(tiny_dirs[style]).pad_token_id
    batch = sft.make_batch(exs, pad_id, flat=flat)
    prompt_lens = [ex["prompt_len"] for ex in exs]
    if flat:
        assert padding_free.enable(model)
        assert batch["input_ids"].shape == (1, sum(len(e["input_ids"]) for e in exs))
    else:
        assert batch["logits_to_keep"] == batch["input_ids"].shape[1] - (min(prompt_lens) - 1)
    assert batch["targets"].tolist() == [t for e in exs for t in e["input_ids"][e["prompt_len"] :]]
    nll = sft.token_nll(model, batch)
    padded = sft.make_batch(exs, pad_id)
    full = model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"]).logits
    nll_full, mask_full = sft_loss(full[:, :-1], padded["labels"][:, 1:])
    assert nll.shape[0] == mask_full.sum().item() == sum(len(e["input_ids"]) - e["prompt_len"] for e in exs)
    torch.testing.assert_close(nll.sum(), nll_full.sum())
    if flat:  # a row filled up to a multiple of 16 (half precision on the CPU) gives the same NLL
        filled = sft.make_batch(exs, pad_id, flat=True, round_to=16)
        assert filled["input_ids"].shape[1] % 16 == 0 and filled["input_ids"].shape[1] - len(batch["targets"]) > 0
        torch.testing.assert_close(sft.token_nll(model, filled), nll, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize(("style", "kind"), [("llama", "chat"), ("gpt2", "chat"), ("gpt2", "text")])
def test_packing_masks_boundaries_and_keeps_examples_apart(
    tiny_dirs: dict[str, str], task: dict, tmp_path: Path, style: str, kind: str
) -> None:
    """No loss crosses a pack boundary: the label of each example's first token is -100 (for gpt2 `text` rows,
    which have no BOS, that token carries a label unpacked), and the packed rows' NLL sum equals the unpacked
    one over the same tokens (so attention does not cross examples either)."""
    model = AutoModelForCausalLM.from_pretrained(tiny_dirs[style])
    pad_id = load_tokenizer(tiny_dirs[style]).pad_token_id
    path = task["sft"]
    if kind == "text":
        path = tmp_path / "text.jsonl"
        path.write_text("".join(json.dumps({"text": f"sort {'dcba'[: i % 4 + 1]} {i}"}) + "\n" for i in range(12)))
    exs = examples(tiny_dirs[style], path, 12)
    assert (exs[0]["labels"][0] != IGNORE_INDEX) == (kind == "text")
    packs = pack_sft(exs, 64)
    assert len(packs) < len(exs)
    packed = sft.make_batch(packs, pad_id)
    for row, pack in enumerate(packs):
        starts = [sum(pack["seq_lens"][:i]) for i in range(len(pack["seq_lens"]))]
        assert all(packed["labels"][row, s].item() == IGNORE_INDEX for s in starts)
        assert all(packed["position_ids"][row, s].item() == 0 for s in starts)
    nll_p = sft.token_nll(model, packed)
    nll_u = sft.token_nll(model, sft.make_batch(exs, pad_id))
    assert nll_p.shape == nll_u.shape
    torch.testing.assert_close(nll_p.sum(), nll_u.sum(), rtol=1e-5, atol=1e-4)
    assert padding_free.enable(model)  # packed rows, padding-free: the examples inside them back to back
    nll_f = sft.token_nll(model, sft.make_batch(packs, pad_id, flat=True))
    torch.testing.assert_close(nll_f, nll_u, rtol=1e-5, atol=1e-4)


def test_packed_run_trains_and_counts_packed_rows(tiny_dirs: dict[str, str], task: dict, tmp_path: Path) -> None:
    """data.packing: batches are packed rows; the loss is still per response token and falls."""
    cfg = make_cfg(
        tiny_dirs["llama"],
        task,
        tmp_path / "run",
        **{
            "data.packing": True,
            "train.max_steps": 20,
            "train.batch_size": 4,
            "train.micro_batch_size": 2,
            "logging.every": 1,
        },
    )
    run = sft.train(cfg)
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert lines[0]["train/units"] > 4 * 7  # a response has <= 7 tokens (6 letters + EOS): rows hold several
    assert lines[-1]["train/loss"] < 0.7 * lines[0]["train/loss"]
    assert lines[-1]["eval/loss"] < lines[0]["train/loss"]


def test_lora_run_saves_a_merged_plain_checkpoint(tiny_dirs: dict[str, str], task: dict, tmp_path: Path) -> None:
    """With model.lora.r > 0 only adapters train; final/ has them merged: a plain AutoModelForCausalLM whose
    weights differ from the base (the adapters learned something) and hold no LoRA keys."""
    overrides = {"model.lora.r": 4, "train.max_steps": 4, "train.eval_every": 0, "optim.lr": 1e-2}
    run = sft.train(make_cfg(tiny_dirs["gpt2"], task, tmp_path / "run", **overrides))
    final = AutoModelForCausalLM.from_pretrained(run / "final")
    base = AutoModelForCausalLM.from_pretrained(tiny_dirs["gpt2"])
    assert not any("lora" in k for k in final.state_dict())
    changed = [k for k, v in final.state_dict().items() if not torch.equal(v, base.state_dict()[k])]
    assert changed and all("attn" in k or "mlp" in k for k in changed)


def test_padded_micro_batches_hold_like_lengths_and_train_as_one_batch(
    tiny_dirs: dict[str, str], task: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Padded micro-batches are cut from the batch longest first (`Engine.local_indices` with lengths), and the step
    is the same as over the whole batch at once; a batch not split, or split into padding-free micro-batches, keeps
    the draw order. The evaluation's padded batches are cut from the held-out examples longest first too, and its
    loss is the one computed in file order."""
    seen: list[tuple[bool, list[int]]] = []
    make_batch = sft.make_batch

    def spy(exs: list[dict], pad_id: int, **kw: object) -> dict:
        seen.append((bool(kw.get("flat")), [len(e["input_ids"]) for e in exs]))
        return make_batch(exs, pad_id, **kw)

    monkeypatch.setattr(sft, "make_batch", spy)
    weights = {}
    for flat, micro in ((False, 2), (False, 8), (True, 2)):
        seen.clear()
        overrides = {"data.padding_free": flat, "train.batch_size": 8, "train.micro_batch_size": micro}
        cfg = make_cfg(tiny_dirs["llama"], task, tmp_path / f"{flat}-{micro}", **overrides, **{"train.max_steps": 3})
        run = sft.train(cfg)
        model = AutoModelForCausalLM.from_pretrained(run / "final")
        weights[flat, micro] = torch.cat([p.detach().flatten() for p in model.parameters()])
        steps = [[lengths for f, lengths in seen[i : i + 8 // micro]] for i in range(0, 3 * 8 // micro, 8 // micro)]
        assert all(f == flat for f, _ in seen[: 3 * 8 // micro])  # the training steps' batches, before evaluation
        held_out = [x for _, lengths in seen[3 * 8 // micro :] for x in lengths]
        assert len(held_out) == 64 and (held_out == sorted(held_out, reverse=True)) == (not flat), held_out
        logged = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["eval/loss"]
        pad_id = load_tokenizer(tiny_dirs["llama"]).pad_token_id
        assert logged == pytest.approx(eval_loss(model, examples(tiny_dirs["llama"], task["sft_eval"], 64), pad_id))
        cuts = [
            sorted((x for mb in step for x in mb), reverse=True) == [x for mb in step for x in mb] for step in steps
        ]
        if flat or micro == 8:  # no split, or no padding: the draw order, not longest first in every step by chance
            assert not all(cuts), steps
        else:
            assert all(cuts), steps
    torch.testing.assert_close(weights[False, 2], weights[False, 8], atol=2e-6, rtol=0)


def test_group_by_length_draws_batches_of_like_length(
    tiny_dirs: dict[str, str], task: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """data.group_by_length: every step's batch holds examples of like length (the task's 17-23 tokens: at most one
    apart, where drawn at random they span 4 or more), and the run trains."""
    spans = []
    make_batch = sft.make_batch

    def spy(exs: list[dict], pad_id: int, **kw: object) -> dict:
        spans.append(max(len(e["input_ids"]) for e in exs) - min(len(e["input_ids"]) for e in exs))
        return make_batch(exs, pad_id, **kw)

    monkeypatch.setattr(sft, "make_batch", spy)
    for grouped in (False, True):
        spans.clear()
        overrides = {"data.group_by_length": grouped, "train.batch_size": 8, "train.micro_batch_size": 8}
        cfg = make_cfg(tiny_dirs["llama"], task, tmp_path / str(grouped), **overrides, **{"train.max_steps": 4})
        run = sft.train(cfg)
        steps = spans[:4]  # the training steps' batches, before evaluation
        assert max(steps) <= 1 if grouped else min(steps) >= 3, steps
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert math.isfinite(lines[-1]["train/loss"])
