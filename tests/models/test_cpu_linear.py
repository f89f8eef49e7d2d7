"""fp32 linear layers through oneDNN on the CPU: the same outputs and gradients as `F.linear`, and the fallbacks."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rlhf.errors import ConfigError
from rlhf.models import cpu_linear, padding_free
from rlhf.tasks.tiny import build_model, build_tokenizer

pytestmark = pytest.mark.skipif(not cpu_linear._onednn_available(), reason="this torch has no oneDNN")


@pytest.fixture
def choice(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """`RLHF_CPU_MATMUL` read afresh in the test (and again after it, for the rest of the session)."""
    cpu_linear.use_onednn.cache_clear()
    cpu_linear._onednn_available.cache_clear()
    yield
    monkeypatch.undo()
    cpu_linear.use_onednn.cache_clear()
    cpu_linear._onednn_available.cache_clear()


def _refuse(*args: object, **kwargs: object) -> None:
    raise AssertionError("this path should not run")


def _layer(in_features: int, out_features: int, bias: bool) -> cpu_linear.Linear:
    torch.manual_seed(0)
    layer = nn.Linear(in_features, out_features, bias=bias)
    layer.__class__ = cpu_linear.Linear
    return layer


@pytest.mark.parametrize(
    ("shape", "bias", "frozen"), [((256, 128), False, False), ((2, 120, 128), True, False), ((3, 90, 128), True, True)]
)
def test_forward_and_gradients_equal_f_linear(
    monkeypatch: pytest.MonkeyPatch, shape: tuple[int, ...], bias: bool, frozen: bool
) -> None:
    """y = x W^T + b, dx = dy W, dW = dy^T x, db = sum dy against `F.linear`'s autograd and a float64 product
    (rows x 128 x 160 >= MIN_MACS, so oneDNN runs: `F.linear` is made to fail inside the layer)."""
    layer = _layer(128, 160, bias)
    layer.requires_grad_(not frozen)
    x = torch.randn(*shape, requires_grad=True)
    grad_y = torch.randn(*shape[:-1], 160)
    assert x.numel() // 128 * 128 * 160 >= cpu_linear.MIN_MACS
    monkeypatch.setattr(cpu_linear.F, "linear", _refuse)
    y = layer(x)
    y.backward(grad_y)
    monkeypatch.undo()

    x_ref = x.detach().clone().requires_grad_()
    w_ref = layer.weight.detach().clone().requires_grad_(not frozen)
    b_ref = layer.bias.detach().clone().requires_grad_(not frozen) if bias else None
    y_ref = F.linear(x_ref, w_ref, b_ref)
    y_ref.backward(grad_y)
    exact = x.detach().double() @ layer.weight.detach().double().t() + (layer.bias.detach().double() if bias else 0)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y.double(), exact, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad.double(), grad_y.double() @ layer.weight.detach().double(), rtol=1e-5, atol=1e-5)
    if frozen:
        assert layer.weight.grad is None
    else:
        dy, xs = grad_y.reshape(-1, 160).double(), x.detach().reshape(-1, 128).double()
        torch.testing.assert_close(layer.weight.grad, w_ref.grad, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(layer.weight.grad.double(), dy.t() @ xs, rtol=1e-5, atol=1e-4)
        if bias:
            torch.testing.assert_close(layer.bias.grad.double(), dy.sum(0), rtol=1e-5, atol=1e-4)


def test_no_grad_runs_onednn_without_autograd(monkeypatch: pytest.MonkeyPatch) -> None:
    layer = _layer(128, 160, True)
    x = torch.randn(256, 128)
    expected = F.linear(x, layer.weight, layer.bias)
    monkeypatch.setattr(cpu_linear._OneDnnLinear, "apply", _refuse)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", ["small", "bf16 weights", "autocast"])
def test_what_onednn_does_not_gain_on_stays_with_f_linear(monkeypatch: pytest.MonkeyPatch, case: str) -> None:
    layer = _layer(128, 160, False)
    x = torch.randn(8 if case == "small" else 256, 128)
    if case == "bf16 weights":
        layer.to(torch.bfloat16)
        x = x.bfloat16()
    expected = F.linear(x, layer.weight).float()
    monkeypatch.setattr(cpu_linear, "_product", _refuse)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=case == "autocast"):
        y = layer(x)
    assert y.dtype == (torch.float32 if case == "small" else torch.bfloat16)
    torch.testing.assert_close(y.float(), expected, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize(("value", "expected"), [("blas", False), ("onednn", True), ("OneDNN ", True)])
def test_the_environment_chooses(monkeypatch: pytest.MonkeyPatch, choice: None, value: str, expected: bool) -> None:
    monkeypatch.setenv(cpu_linear.ENV, value)
    assert cpu_linear.use_onednn() is expected


def test_auto_is_oneDNN_on_amd_only(monkeypatch: pytest.MonkeyPatch, choice: None) -> None:
    monkeypatch.delenv(cpu_linear.ENV, raising=False)
    for vendor, expected in [("AuthenticAMD", torch.backends.mkl.is_available()), ("GenuineIntel", False)]:
        monkeypatch.setattr(cpu_linear, "_cpu_vendor", lambda vendor=vendor: vendor)
        cpu_linear.use_onednn.cache_clear()
        assert cpu_linear.use_onednn() is expected


def test_an_unknown_choice_is_an_error(monkeypatch: pytest.MonkeyPatch, choice: None) -> None:
    monkeypatch.setenv(cpu_linear.ENV, "mkl")
    with pytest.raises(ConfigError, match="variable RLHF_CPU_MATMUL='mkl': expected one of auto, onednn, blas"):
        cpu_linear.use_onednn()


@pytest.mark.parametrize("answer", ["raises", "wrong"])
def test_a_torch_whose_onednn_op_misbehaves_falls_back_with_a_warning(
    monkeypatch: pytest.MonkeyPatch, choice: None, caplog: pytest.LogCaptureFixture, answer: str
) -> None:
    def product(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if answer == "raises":
            raise RuntimeError("unknown overload\nmore lines")
        return x @ weight.t() + 1

    monkeypatch.setenv(cpu_linear.ENV, "onednn")
    monkeypatch.setattr(cpu_linear, "_product", product)
    assert cpu_linear.use_onednn() is False
    assert "oneDNN's linear product is not usable" in caplog.text
    assert ("unknown overload" if answer == "raises" else "a wrong product") in caplog.text


def test_a_switched_model_trains_like_the_stock_one(monkeypatch: pytest.MonkeyPatch, choice: None, tmp_path) -> None:
    """A model with every linear layer switched (hidden 256: each has >= MIN_WEIGHT weights): the same loss and
    gradients as its stock twin, the same checkpoint, and flat rows filled to a multiple of 16
    (`padding_free.row_multiple`); at hidden 128 none is switched."""
    monkeypatch.setenv(cpu_linear.ENV, "onednn")
    tokenizer = build_tokenizer("llama")
    small = build_model(tokenizer, "llama", hidden_size=128, num_layers=2)  # every layer under MIN_WEIGHT
    assert cpu_linear.enable(small) == 0 and not cpu_linear.enabled(small)
    stock = build_model(tokenizer, "llama", hidden_size=256, num_layers=2)
    switched = copy.deepcopy(stock)
    linears = sum(type(m) is nn.Linear for m in stock.modules())
    assert cpu_linear.enable(switched) == linears == 2 * 7 + 1
    assert cpu_linear.enabled(switched) and not cpu_linear.enabled(stock)
    assert type(copy.deepcopy(switched).lm_head) is cpu_linear.Linear
    assert padding_free.row_multiple(switched, torch.device("cpu")) == padding_free.ROW_MULTIPLE
    assert padding_free.row_multiple(stock, torch.device("cpu")) == 1

    ids = torch.randint(3, len(tokenizer), (4, 80))
    losses, grads = [], []
    for model in (stock, switched):
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        losses.append(out.loss)
        grads.append({n: p.grad for n, p in model.named_parameters()})
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-4, atol=1e-6, msg=name)

    switched.save_pretrained(tmp_path)
    reloaded = type(stock).from_pretrained(tmp_path)
    for name, tensor in stock.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], tensor), name


# 400 products at as many row counts: oneDNN builds (and caches) a primitive for each. The process's growth in MiB.
PRODUCTS_AT_NEW_ROW_COUNTS = """
import os, sys
import torch
from rlhf.models import cpu_linear
if sys.argv[1] == "bounded":
    cpu_linear.bound_primitive_caches()
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
w = torch.randn(1024, 256)
cpu_linear._product(torch.randn(16, 256), w)
base = rss()
for rows in range(32, 32 + 8 * 400, 8):
    cpu_linear._product(torch.randn(rows, 256), w)
print(rss() - base)
"""


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="reads the resident set from /proc")
def test_bounded_primitive_caches_bound_what_new_row_counts_cost() -> None:
    """With both primitive caches at `PRIMITIVE_CACHE_CAPACITY` entries, 400 products at new row counts grow the
    process by less than half of what the default 1024 entries let them (~85 against ~235 MiB on the machines of
    benchmarks/README.md)."""
    env = {k: v for k, v in os.environ.items() if k not in cpu_linear.PRIMITIVE_CACHES}

    def growth(mode: str) -> float:
        cmd = [sys.executable, "-c", PRODUCTS_AT_NEW_ROW_COUNTS, mode]
        return float(subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout)

    assert growth("bounded") < 0.5 * growth("default")


def test_loading_a_model_bounds_the_caches_unless_the_environment_sizes_them(
    monkeypatch: pytest.MonkeyPatch, tiny_dirs: dict[str, str]
) -> None:
    from rlhf.config import ModelConfig
    from rlhf.models.loading import load_causal_lm

    for name in cpu_linear.PRIMITIVE_CACHES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("LRU_CACHE_CAPACITY", "300")
    load_causal_lm(ModelConfig(path=tiny_dirs["llama"]), trainable=False)
    assert os.environ["LRU_CACHE_CAPACITY"] == "300"
    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == str(cpu_linear.PRIMITIVE_CACHE_CAPACITY)
