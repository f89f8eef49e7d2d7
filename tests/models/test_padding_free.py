"""Padding-free batches: the flat layout by hand, and the flat forward against the padded one."""

from __future__ import annotations

import copy
import functools
import itertools
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from rlhf.models import padding_free, precision
from rlhf.models.padding_free import flat_inputs, flat_layout, flat_position_ids

SEQS = [[5, 70, 71, 72, 2], [5, 80], [5, 90, 91, 92, 93, 94, 2], [5]]


def test_layout_by_hand() -> None:
    """Lengths 2 and 3: one block, longest first: rows [t2 t3 t4] [t0 t1 pad], pads at token 0."""
    layout = flat_layout([2, 3])
    assert [(b.rows, b.length) for b in layout.blocks] == [(2, 3)]
    assert layout.gather.tolist() == [2, 3, 4, 0, 1, 0]
    assert layout.scatter.tolist() == [3, 4, 0, 1, 2]
    assert layout.pads.tolist() == [5]
    assert layout.starts.tolist() == [0, 2, 5] and layout.starts.dtype == torch.int32
    assert flat_position_ids([2, 3]).tolist() == [[0, 1, 0, 1, 2]]
    assert flat_position_ids([1, 3, 1, 1]).tolist() == [[0, 0, 1, 2, 0, 0]]
    with pytest.raises(ValueError, match="at least one token"):
        flat_layout([2, 0])


def test_a_long_sequence_gets_its_own_block() -> None:
    """Lengths 1, 100, 1, 1, 1: one block of 5 x 100 costs 128 + 500 x 2.5625 = 1409 positions; the long one
    alone plus a 4 x 1 block costs 128 + 256.25 + 128 + 4.0625 = 516.3."""
    layout = flat_layout([1, 100, 1, 1, 1])
    assert [(b.rows, b.length) for b in layout.blocks] == [(1, 100), (4, 1)]
    assert layout.gather.tolist() == [*range(1, 101), 0, 101, 102, 103]  # the blocks end to end, no pads
    assert layout.scatter.tolist() == [100, *range(100), 101, 102, 103]
    assert layout.pads.tolist() == []


def _gqa_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, attn_implementation="sdpa",
    )  # fmt: skip
    return LlamaForCausalLM(cfg)


def _models(tiny_dirs: dict[str, str], style: str) -> torch.nn.Module:
    if style == "llama-gqa":
        return _gqa_llama()
    return AutoModelForCausalLM.from_pretrained(tiny_dirs[style], attn_implementation="sdpa")


def _padded_logits(model: torch.nn.Module) -> list[torch.Tensor]:
    """Each sequence's logits from a right-padded batch with an attention mask (the reference)."""
    width = max(map(len, SEQS))
    ids = torch.tensor([s + [0] * (width - len(s)) for s in SEQS])
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in SEQS])
    logits = model(input_ids=ids, attention_mask=mask).logits
    return [logits[i, : len(s)] for i, s in enumerate(SEQS)]


@pytest.mark.parametrize("style", ["llama", "gpt2", "llama-gqa"])
@pytest.mark.parametrize("block_overhead", [padding_free.BLOCK_OVERHEAD_POSITIONS, 0])
def test_flat_forward_and_gradients_equal_the_padded_batch(
    tiny_dirs: dict[str, str], style: str, block_overhead: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the default cost one attention block; with no block overhead one block per length (4 here)."""
    monkeypatch.setattr(padding_free, "BLOCK_OVERHEAD_POSITIONS", block_overhead)
    assert len(flat_layout([len(s) for s in SEQS]).blocks) == (1 if block_overhead else 4)
    padded_model = _models(tiny_dirs, style)
    flat_model = copy.deepcopy(padded_model)
    assert padding_free.enable(flat_model)

    want = _padded_logits(padded_model)
    lengths = [len(s) for s in SEQS]
    flat_ids = torch.tensor([t for s in SEQS for t in s])[None]
    got = flat_model(input_ids=flat_ids, **flat_inputs(lengths)).logits[0]
    torch.testing.assert_close(got, torch.cat(want), atol=1e-5, rtol=1e-5)

    # the same loss on both sides gives the same gradients (pads get none)
    torch.cat(want).square().mean().backward()
    got.square().mean().backward()
    for (name, p), q in zip(padded_model.named_parameters(), flat_model.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, atol=1e-6, rtol=1e-4, msg=name)


def _plain_varlen_attn(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_q: torch.Tensor,
    cu_k: torch.Tensor,
    max_q: int,
    max_k: int,
    *,
    scale: float | None = None,
    window_size: tuple[int, int] = (-1, -1),
    enable_gqa: bool = False,
    aligned: str = "end",
) -> torch.Tensor:
    """A stand-in for `torch.nn.attention.varlen.varlen_attn` (CUDA only): causal sdpa of each sequence alone, (T,
    heads, d) in and out, query sequence i at [cu_q[i], cu_q[i + 1]) and its keys at [cu_k[i], cu_k[i + 1]). Where
    a sequence has more keys than queries, causal attention is aligned at the end of the keys (flash attention's
    rule: query j of Lq sees keys <= j + Lk - Lq), or, with `aligned="start"`, at their start (the other
    convention, which a tree must not get)."""
    assert window_size == (-1, 0) and cu_q.dtype == cu_k.dtype == torch.int32
    outs, longest = [], [0, 0]
    for (a, b), (c, d) in zip(itertools.pairwise(cu_q.tolist()), itertools.pairwise(cu_k.tolist()), strict=True):
        lq, lk = b - a, d - c
        longest = [max(longest[0], lq), max(longest[1], lk)]
        shift = lk - lq if aligned == "end" else 0
        sees = torch.arange(lk)[None, :] <= torch.arange(lq)[:, None] + shift  # (Lq, Lk)
        qi, ki, vi = q[a:b].transpose(0, 1), k[c:d].transpose(0, 1), v[c:d].transpose(0, 1)
        out = F.scaled_dot_product_attention(qi, ki, vi, attn_mask=sees, scale=scale, enable_gqa=enable_gqa)
        outs.append(out.transpose(0, 1))
    assert [max_q, max_k] == longest
    return torch.cat(outs)


def _torch_2_10_varlen_attn(*args: Any, is_causal: bool = False) -> torch.Tensor:
    """The stand-in with torch 2.10's signature: `is_causal`, the default scale, as many key as query heads."""
    q, k = args[:2]
    assert is_causal and k.shape[1] == q.shape[1]
    return _plain_varlen_attn(*args, window_size=(-1, 0))


@pytest.mark.parametrize("kernel", [_plain_varlen_attn, _torch_2_10_varlen_attn], ids=["torch-2.11", "torch-2.10"])
@pytest.mark.parametrize("style", ["llama", "gpt2", "llama-gqa"])
def test_the_varlen_route_gives_the_padded_batch(
    tiny_dirs: dict[str, str], style: str, kernel: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The CUDA route (one `varlen_attn` call per layer over the flat row), run on the CPU in fp32 with a plain
    stand-in for the kernel: the offsets, head layout, scale and GQA heads it hands over give the padded batch's
    logits and gradients, with both signatures of `varlen_attn`. The kernel itself is compared on a GPU (below)."""
    import torch.nn.attention.varlen as varlen

    @functools.wraps(kernel)  # its signature: the route reads which `varlen_attn` it has from it
    def causal(*args: Any, **kwargs: Any) -> torch.Tensor:
        assert torch.equal(args[3], args[4])  # causal sequences: the same offsets for queries and keys
        return kernel(*args, **kwargs)

    padded_model = _models(tiny_dirs, style)
    for module in padded_model.modules():  # a scale other than the kernel's default 1 / sqrt(d)
        if hasattr(module, "scaling"):
            module.scaling = 1.5 * module.scaling
    flat_model = copy.deepcopy(padded_model)
    assert padding_free.enable(flat_model)
    monkeypatch.setattr(varlen, "varlen_attn", causal)
    monkeypatch.setattr(padding_free, "varlen_applies", lambda *args: True)
    monkeypatch.setattr(padding_free, "_attention_dtype", lambda value: torch.float32)
    monkeypatch.setattr(padding_free, "_sdpa", None)  # the block route would fail
    want = torch.cat(_padded_logits(padded_model))
    flat_ids = torch.tensor([t for s in SEQS for t in s])[None]
    got = flat_model(input_ids=flat_ids, **flat_inputs([len(s) for s in SEQS])).logits[0]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    want.square().mean().backward()
    got.square().mean().backward()
    for (name, p), q in zip(padded_model.named_parameters(), flat_model.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, atol=1e-6, rtol=1e-4, msg=name)


def test_a_varlen_kernel_that_raises_sends_the_device_back_to_the_blocks(
    tiny_dirs: dict[str, str], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A `varlen_attn` that raises (a torch build or GPU without the kernel) costs a warning, not the run: that
    forward and every later one on the device run the sdpa blocks, and give the padded batch's logits."""
    import torch.nn.attention.varlen as varlen

    calls = []

    def broken(*args: Any, **kwargs: Any) -> torch.Tensor:
        calls.append(1)
        raise RuntimeError("no kernel image is available for execution on the device")

    monkeypatch.setattr(varlen, "varlen_attn", broken)
    monkeypatch.setattr(padding_free, "_VARLEN_FAILED", set())
    # as on a GPU that has the kernel, until it fails there
    monkeypatch.setattr(
        padding_free, "varlen_applies", lambda query, *_: query.device not in padding_free._VARLEN_FAILED
    )
    model = _models(tiny_dirs, "llama")
    want = torch.cat(_padded_logits(model))
    assert padding_free.enable(model)
    flat_ids = torch.tensor([t for s in SEQS for t in s])[None]
    with caplog.at_level("WARNING", logger="rlhf.models.padding_free"):
        for _ in range(2):
            got = model(input_ids=flat_ids, **flat_inputs([len(s) for s in SEQS])).logits[0]
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert calls == [1] and "varlen flash attention failed" in caplog.text


def test_the_varlen_route_gives_a_tree_its_blocks_attention(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tree sequences [trunk | branch 1 | ... | branch k] (a GRPO group's shared prompt, DPO's [prompt | chosen |
    rejected]; a zero-length branch too) through the varlen route, with a stand-in kernel that aligns causal
    attention at the end of the keys as flash attention does: the logits and gradients of the sdpa blocks with
    tree masks. The same stand-in aligned at the start of the keys fails the per-device check, so trees would
    keep the blocks on such a kernel."""
    import torch.nn.attention.varlen as varlen

    spans = [[4, 3, 2, 5], [3, 2, 3, 0], [5, 1, 0, 0]]
    inputs = padding_free.tree_inputs(spans)
    layout = inputs[padding_free.LAYOUT_KWARG]
    tree = layout.varlen_tree
    assert tree.cu_q.tolist() == [0, 4, 7, 9, 14, 17, 19, 22, 27, 28]
    assert tree.cu_k.tolist() == [0, 4, 11, 17, 26, 29, 34, 40, 45, 51]
    assert tree.keys[4:17].tolist() == [0, 1, 2, 3, 4, 5, 6, 0, 1, 2, 3, 7, 8]  # branch 1: trunk, itself; branch 2
    torch.manual_seed(0)
    model = _gqa_llama()
    ids = torch.randint(0, 128, (1, sum(map(sum, spans))))
    want = model(input_ids=ids, **inputs).logits  # not switched: the reference has to be built by hand below
    assert padding_free.enable(model)
    blocks = model(input_ids=ids, **inputs).logits[0]
    blocks.square().mean().backward()
    want_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    monkeypatch.setattr(varlen, "varlen_attn", _plain_varlen_attn)
    monkeypatch.setattr(padding_free, "varlen_applies", lambda *args: True)
    monkeypatch.setattr(padding_free, "_attention_dtype", lambda value: torch.float32)
    monkeypatch.setattr(padding_free, "_sdpa", None)  # the block route would fail
    got = model(input_ids=ids, **inputs).logits[0]
    torch.testing.assert_close(got, blocks, atol=1e-5, rtol=1e-5)
    got.square().mean().backward()
    for p, g in zip(model.parameters(), want_grads, strict=True):
        torch.testing.assert_close(p.grad, g, atol=1e-6, rtol=1e-4)
    assert not torch.allclose(want[0], blocks)  # plain causal attention over a whole tree is another thing
    agree = padding_free._varlen_trees_agree.__wrapped__
    assert agree(torch.device("cpu"), torch.bfloat16)
    monkeypatch.setattr(varlen, "varlen_attn", functools.partial(_plain_varlen_attn, aligned="start"))
    assert not agree(torch.device("cpu"), torch.bfloat16)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_varlen_flash_attention_on_the_gpu_gives_the_padded_batch(tiny_dirs: dict[str, str]) -> None:
    """bf16 on CUDA: the flat forward through `varlen_attn` against the padded batch's sdpa (bf16 rounding)."""
    model = AutoModelForCausalLM.from_pretrained(tiny_dirs["llama"], dtype=torch.bfloat16).cuda()
    want = torch.cat(_padded_logits(model))
    assert padding_free.enable(model)
    inputs = {
        k: v.cuda() if isinstance(v, torch.Tensor) else v.to("cuda")
        for k, v in flat_inputs([len(s) for s in SEQS]).items()
    }
    q = torch.zeros(1, 4, 8, 16, dtype=torch.bfloat16, device="cuda")
    if not padding_free.varlen_applies(q, q, inputs[padding_free.LAYOUT_KWARG], {}):
        pytest.skip("this GPU or torch has no variable-length flash attention")
    flat_ids = torch.tensor([t for s in SEQS for t in s], device="cuda")[None]
    got = model(input_ids=flat_ids, **inputs).logits[0]
    torch.testing.assert_close(got.float(), want.float(), atol=5e-2, rtol=5e-2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_varlen_flash_attention_on_the_gpu_gives_a_tree_its_blocks_attention(
    tiny_dirs: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """bf16 on CUDA: tree sequences (a shared prompt and its branches) through `varlen_attn`, which passed the
    per-device check, against the sdpa blocks with tree masks (bf16 rounding)."""
    model = AutoModelForCausalLM.from_pretrained(tiny_dirs["llama"], dtype=torch.bfloat16).cuda()
    assert padding_free.enable(model)
    spans = [[6, 3, 4], [4, 5, 0]]
    inputs = {k: v.to("cuda") for k, v in padding_free.tree_inputs(spans).items()}
    q = torch.zeros(1, 4, 8, 16, dtype=torch.bfloat16, device="cuda")
    if not padding_free.varlen_applies(q, q, inputs[padding_free.LAYOUT_KWARG], {}):
        pytest.skip("this GPU or torch has no variable-length flash attention that gives a tree's attention")
    ids = torch.randint(7, 200, (1, sum(map(sum, spans))), device="cuda")
    got = model(input_ids=ids, **inputs).logits[0]
    monkeypatch.setattr(padding_free, "varlen_applies", lambda *args: False)
    want = model(input_ids=ids, **inputs).logits[0]
    torch.testing.assert_close(got.float(), want.float(), atol=5e-2, rtol=5e-2)


@pytest.mark.parametrize("style", ["llama", "gpt2"])
def test_a_filler_rounds_the_row_up_and_changes_no_real_logit(tiny_dirs: dict[str, str], style: str) -> None:
    """15 real tokens with round_to 12: a 9-token filler sequence ends the row (T = 24), attends to itself alone,
    and the 15 real positions get the logits they get without it."""
    model = _models(tiny_dirs, style)
    assert padding_free.enable(model)
    lengths = [len(s) for s in SEQS]
    ids = [t for s in SEQS for t in s]
    assert padding_free.filler_length(len(ids), 12) == 9 and padding_free.filler_length(24, 12) == 0
    plain = model(input_ids=torch.tensor(ids)[None], **flat_inputs(lengths)).logits[0]
    filled_inputs = flat_inputs(lengths, round_to=12)
    assert filled_inputs["position_ids"].tolist() == [[*flat_position_ids(lengths)[0].tolist(), *range(9)]]
    filled = model(input_ids=torch.tensor(ids + [3] * 9)[None], **filled_inputs).logits[0]
    assert filled.shape[0] == 24
    torch.testing.assert_close(filled[:15], plain, atol=1e-6, rtol=1e-5)


def test_rows_are_filled_only_for_half_precision_matmuls_on_the_cpu() -> None:
    """Under autocast now, under the engine's autocast (marked on the model) or with bf16 weights; fp32 and fp16
    autocast marks fill nothing on a GPU."""
    model, plain = _gqa_llama(), _gqa_llama()
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert padding_free.row_multiple(model, cpu) == 1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert padding_free.row_multiple(model, cpu) == padding_free.ROW_MULTIPLE == 16
    precision.mark_autocast(model, "no")
    assert padding_free.row_multiple(model, cpu) == 1
    precision.mark_autocast(model, "bf16")
    assert padding_free.row_multiple(model, cpu) == 16 and padding_free.row_multiple(model, cuda) == 1
    assert padding_free.row_multiple(model.model, cpu) == 16  # the transformers models inside are marked too
    assert padding_free.row_multiple(plain.to(torch.bfloat16), cpu) == 16


@pytest.mark.parametrize("style", ["llama", "gpt2"])
def test_flat_forward_builds_no_attention_mask(
    tiny_dirs: dict[str, str], style: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`transformers` would otherwise materialise a (T, T) block-diagonal mask from the restarting positions
    (quadratic in the batch's tokens) that the flat attention never reads; padded calls still get theirs."""
    seen: list[torch.Tensor | None] = []
    attention = padding_free.attention

    def spy(module: torch.nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: object, **kw: object):  # type: ignore[no-untyped-def]
        seen.append(mask)
        return attention(module, q, k, v, mask, **kw)

    monkeypatch.setattr(padding_free, "attention", spy)
    model = AutoModelForCausalLM.from_pretrained(tiny_dirs[style], attn_implementation="sdpa")
    assert padding_free.enable(model)
    lengths = [len(s) for s in SEQS]
    model(input_ids=torch.tensor([t for s in SEQS for t in s])[None], **flat_inputs(lengths), use_cache=False)
    assert seen and all(m is None for m in seen)
    seen.clear()
    model(input_ids=torch.tensor([[0, 5, 70], [5, 80, 81]]), attention_mask=torch.tensor([[0, 1, 1], [1, 1, 1]]))
    assert seen and all(m is not None for m in seen)


def test_calls_without_a_layout_are_plain_sdpa(tiny_dirs: dict[str, str]) -> None:
    """Generation-style left-padded calls on an enabled model give what the unswitched model gives."""
    model = AutoModelForCausalLM.from_pretrained(tiny_dirs["llama"], attn_implementation="sdpa")
    ids = torch.tensor([[0, 0, 5, 70, 71], [5, 80, 81, 82, 83]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    want = model(input_ids=ids, attention_mask=mask).logits
    assert padding_free.enable(model)
    assert model.config._attn_implementation == padding_free.ATTENTION
    torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits, want)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert out.shape == (2, 8)


def test_gradient_checkpointing_replays_the_flat_attention(tiny_dirs: dict[str, str]) -> None:
    """Recomputation in the backward goes through the same layout, so the gradients do not change."""
    plain = AutoModelForCausalLM.from_pretrained(tiny_dirs["llama"], attn_implementation="sdpa")
    ckpt = copy.deepcopy(plain)
    ckpt.gradient_checkpointing_enable()
    lengths = [len(s) for s in SEQS]
    kwargs = {"input_ids": torch.tensor([t for s in SEQS for t in s])[None], **flat_inputs(lengths), "use_cache": False}
    for model in (plain, ckpt):
        assert padding_free.enable(model)
        model.train()
        model(**kwargs).logits.square().mean().backward()
    for p, q in zip(plain.parameters(), ckpt.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad)


def test_eager_models_keep_padded_batches(tiny_dirs: dict[str, str]) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_dirs["llama"], attn_implementation="eager")
    assert not padding_free.enable(model)
    assert model.config._attn_implementation == "eager"


TINY = {"vocab_size": 128, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64}  # fmt: skip


@pytest.mark.parametrize(
    ("model_type", "kwargs"),
    [
        ("stablelm", {}),  # its decoder layers drop the keyword arguments: the layout never reaches attention
        ("falcon", {"new_decoder_architecture": True, "num_kv_heads": 2}),  # tests for the name "sdpa"
        ("lfm2", {"full_attn_idxs": [1]}),  # a convolution layer carries state along the row
    ],
)
def test_models_whose_sequences_would_meet_in_a_flat_row_keep_padded_batches(model_type: str, kwargs: Any) -> None:
    """`enable` declines them, leaving sdpa as it was, and a scoring pass handed a flat layout gives each row the
    log-probs it has alone (a flat row gave StableLM's 0.09-0.16 off, before `enable` checked)."""
    from transformers import AutoConfig

    from rlhf.models.forward import Unpadded, causal_lm_logprobs

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **TINY, **kwargs)).eval()
    assert model.config._attn_implementation == "sdpa"
    assert not padding_free.enable(model) and model.config._attn_implementation == "sdpa"
    width = max(map(len, SEQS))
    ids = torch.tensor([s + [0] * (width - len(s)) for s in SEQS])
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in SEQS])
    with torch.no_grad():
        got = causal_lm_logprobs(model, ids, mask, flat=Unpadded.of(mask)).logprobs
        for row, seq in enumerate(SEQS[:3]):  # the last has no token to score
            logits = model(input_ids=torch.tensor([seq])).logits[0, :-1]
            want = torch.log_softmax(logits, -1).gather(-1, torch.tensor(seq[1:])[:, None]).squeeze(-1)
            torch.testing.assert_close(got[row, : len(seq) - 1], want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("model_type", "kwargs"), [("mistral", {}), ("gemma3_text", {"head_dim": 8})])
def test_sliding_window_layers_see_the_window_in_flat_rows_and_trees(model_type: str, kwargs: Any) -> None:
    """A window of 3 positions on sequences of up to 10 tokens (Mistral: every layer; Gemma 3: its sliding layers):
    the flat row and the shared-prompt trees give the padded batch's log-probs and gradients, which the window
    changes (0.05 here, against a window of 100). Before, a sequence longer than the window was refused."""
    from transformers import AutoConfig

    from rlhf.models.forward import Unpadded, causal_lm_logprobs

    ids = torch.tensor([[1, 5, 6, 7, 8, 9, 10, 11, 12, 0], [0, 1, 20, 21, 22, 23, 24, 25, 26, 27],
                        [0, 1, 20, 21, 22, 30, 31, 0, 0, 0]])  # fmt: skip
    mask = (ids != 0).long()  # rows 1 and 2 share the prompt [1 20 21 22] (the first 5 columns)
    scored = (mask[:, 1:] * mask[:, :-1]).bool()  # tokens predicted from a token
    results = []
    for window in (3, 100):
        config = AutoConfig.for_model(model_type, **TINY, sliding_window=window, **kwargs)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config)
        grads = []
        for flat in (None, Unpadded.of(mask), Unpadded.of(mask, ids, prompt_len=5)):
            assert flat is None or padding_free.enable(model)
            model.zero_grad()
            logprobs = causal_lm_logprobs(model, ids, mask, flat=flat).logprobs
            logprobs[scored].sum().backward()
            grads.append((logprobs[scored], torch.cat([p.grad.flatten() for p in model.parameters()])))
        (want, want_grad), *flat_ones = grads
        for got, got_grad in flat_ones:
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(got_grad, want_grad, atol=1e-5, rtol=1e-4)
        results.append(want)
    assert (results[0] - results[1]).abs().max() > 0.01


def test_models_run_padding_free_only_when_every_one_given_is_switched(tiny_dirs: dict[str, str]) -> None:
    eager = AutoModelForCausalLM.from_pretrained(tiny_dirs["llama"], attn_implementation="eager")
    flat = AutoModelForCausalLM.from_pretrained(tiny_dirs["llama"])
    assert padding_free.enable(flat)
    assert padding_free.enabled(flat) and padding_free.enabled(flat, None)  # None: a model the caller lacks
    assert not padding_free.enabled(flat, eager) and not padding_free.enabled(eager, None)


@pytest.mark.parametrize(("length", "head"), [(24, 16), (1023, 16), (1024, 16), (63, 256), (64, 256)])
def test_short_half_precision_attention_on_the_cpu_runs_in_fp32(length: int, head: int) -> None:
    """Under bf16 autocast (fp32 q/k after rotary, bf16 v), attention whose length x head size is below
    UPCAST_BELOW (16384) is fp32 sdpa on the inputs as they come, cast to bf16; from there on it is sdpa as
    autocast runs it, on inputs rounded to bf16. Both carry gradients to q, k and v."""
    g = torch.Generator().manual_seed(0)
    q, k = (torch.randn(1, 2, length, head, generator=g, requires_grad=True) for _ in range(2))
    v = torch.randn(1, 2, length, head, generator=g).bfloat16().requires_grad_()
    module = torch.nn.Module()
    module.is_causal = True
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = padding_free._sdpa(module, q, k, v, None)
    out.float().sum().backward()
    assert out.dtype == torch.bfloat16 and all(x.grad is not None for x in (q, k, v))
    if length * head < 16384:
        want = F.scaled_dot_product_attention(*(x.detach().float() for x in (q, k, v)), is_causal=True).bfloat16()
    else:
        want = F.scaled_dot_product_attention(*(x.detach().bfloat16() for x in (q, k, v)), is_causal=True)
    torch.testing.assert_close(out.detach(), want.transpose(1, 2), rtol=0, atol=0)
