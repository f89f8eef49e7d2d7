"""The report's figures, each a PNG (bytes) drawn with matplotlib's Agg backend: nothing is shown, nothing needs a
display or the network.

    training_curves(run)          one panel per kind of metric the run logged (loss, reward, KL, ...)
    over_optimisation(metrics)    gold and proxy reward of the policy evaluated during training, against its KL
    policy_scatter(evaluation)    each evaluated policy's gold reward against its KL to the reference
    win_rates(evaluation)         each policy's win rate against the baseline with its 95% interval
    calibration(calibration)      a reward model's reliability diagram
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

PANELS: list[tuple[str, list[str]]] = [
    ("loss", ["train/loss", "eval/loss"]),
    ("reward", ["reward/score", "reward/shaped", "eval/proxy", "eval/gold"]),
    ("KL to the reference, nats per answer", ["objective/kl", "eval/kl"]),
    ("KL in the loss, per token", ["policy/kl"]),
    ("KL coefficient", ["objective/kl_coef"]),
    ("entropy", ["objective/entropy", "policy/entropy"]),
    ("clip fraction", ["policy/clipfrac", "value/clipfrac"]),
    ("preference accuracy", ["rewards/accuracy", "eval/accuracy", "eval/rewards/accuracy"]),
    ("reward margin", ["rewards/margin", "eval/margin", "eval/rewards/margin"]),
    ("response length", ["response/length", "eval/length"]),
    ("hacking signals", ["hacking/length_drift", "hacking/repetition", "hacking/ensemble_std"]),
]
"""(title, metric keys) of the training-curve panels; a panel is drawn when the run logged one of its keys. Keys
that share a panel share a unit: GRPO's `policy/kl` (the loss's KL term, per token) is not on the axis of the KL
per answer (`objective/kl`, `eval/kl`), which is its value times the answer's length."""

GOLD, PROXY = "#c0392b", "#2471a3"


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _style(ax: Any, title: str, xlabel: str) -> None:
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel, fontsize=8)
    ax.tick_params(labelsize=8)
    ax.grid(alpha=0.3)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)


def series(metrics: Sequence[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of one metric over a run's metrics lines (lines without it skipped)."""
    rows = [m for m in metrics if isinstance(m.get(key), int | float)]
    return [float(m["step"]) for m in rows], [float(m[key]) for m in rows]


def smoothed(values: Sequence[float], span: int) -> list[float]:
    """Exponential moving average with alpha = 2 / (span + 1), started at the first value."""
    alpha, out, level = 2.0 / (span + 1), [], values[0]
    for v in values:
        level = alpha * v + (1 - alpha) * level
        out.append(level)
    return out


def _varies(metrics: Sequence[dict[str, Any]], key: str) -> bool:
    values = series(metrics, key)[1]
    return len(values) > 0 and max(values) - min(values) > 1e-12 * max(1.0, abs(values[0]))


def panel_lines(metrics: Sequence[dict[str, Any]]) -> list[tuple[str, list[list[str]]]]:
    """The panels (see PANELS) the run's metrics draw, each as (title, lines): a line is the keys of one series, or
    of several equal ones (`reward/shaped` is `reward/score` when no shaping applies), drawn once and labelled
    with all of them. Panels whose every series is constant (a fixed KL coefficient, a clip fraction of 0) are
    left out."""
    out = []
    for title, keys in PANELS:
        keys = [k for k in keys if series(metrics, k)[0]]
        if not any(_varies(metrics, k) for k in keys):
            continue
        lines: list[list[str]] = []
        for key in keys:
            same = next((line for line in lines if series(metrics, line[0]) == series(metrics, key)), None)
            if same is None:
                lines.append([key])
            else:
                same.append(key)
        out.append((title, lines))
    return out


def training_curves(metrics: Sequence[dict[str, Any]]) -> bytes | None:
    """A grid of the run's panels (`panel_lines`), x = optimizer step; None if no panel applies. Long noisy series
    are drawn faintly with their moving average on top."""
    panels = panel_lines(metrics)
    if not panels:
        return None
    cols = min(3, len(panels))
    rows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 2.9 * rows), squeeze=False)
    for ax, (title, lines) in zip(axes.flat, panels, strict=False):
        for i, keys in enumerate(lines):
            x, y = series(metrics, keys[0])
            label = " = ".join(keys)
            color = plt.cm.tab10(i % 10)
            if len(x) > 40:
                ax.plot(x, y, color=color, linewidth=0.8, alpha=0.25)
                ax.plot(x, smoothed(y, max(5, len(x) // 20)), color=color, linewidth=1.6, label=label)
            else:
                ax.plot(
                    x, y, color=color, marker="o" if len(x) < 12 else None, markersize=3, linewidth=1.3, label=label
                )
        _style(ax, title, "step")
        ax.legend(fontsize=7, frameon=False)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.tight_layout()
    return _png(fig)


def over_optimisation(metrics: Sequence[dict[str, Any]]) -> bytes | None:
    """Gold and proxy reward of the in-training evaluations against their KL to the reference (Gao et al. 2023,
    "Scaling Laws for Reward Model Overoptimization", Fig. 1): two axes, since the two rewards have their own
    scales. None unless the run logged eval/gold, eval/proxy and eval/kl together."""
    rows = [m for m in metrics if all(k in m for k in ("eval/gold", "eval/proxy", "eval/kl"))]
    if len(rows) < 2:
        return None
    rows.sort(key=lambda m: m["eval/kl"])  # a curve over KL (the KL of successive evaluations can dip)
    kl = [m["eval/kl"] for m in rows]
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    ax.plot(kl, [m["eval/gold"] for m in rows], "o-", color=GOLD, markersize=4, label="gold reward (what we want)")
    ax.set_ylabel("gold reward", color=GOLD, fontsize=9)
    ax.tick_params(axis="y", colors=GOLD)
    best = max(range(len(rows)), key=lambda i: rows[i]["eval/gold"])
    iteration = int(rows[best].get("grpo/iteration", rows[best].get("ppo/iteration", 0)))
    ax.annotate(
        f"gold peaks (iteration {iteration})",
        (kl[best], rows[best]["eval/gold"]),
        textcoords="offset points",
        xytext=(30, -24),
        fontsize=8,
        color=GOLD,
        bbox={"boxstyle": "round", "fc": "white", "ec": GOLD, "lw": 0.6},
        arrowprops={"arrowstyle": "->", "color": GOLD},
    )
    twin = ax.twinx()
    twin.plot(kl, [m["eval/proxy"] for m in rows], "s--", color=PROXY, markersize=4, label="proxy reward (the RM)")
    twin.set_ylabel("proxy reward (reward model)", color=PROXY, fontsize=9)
    twin.tick_params(axis="y", colors=PROXY, labelsize=8)
    _style(ax, "Over-optimisation: the proxy keeps rising while the gold falls", "KL(policy || reference), nats")
    lines = ax.get_lines()[:1] + twin.get_lines()
    ax.legend(lines, [line.get_label() for line in lines], fontsize=8, frameon=False, loc="lower right")
    fig.tight_layout()
    return _png(fig)


def policy_scatter(policies: dict[str, dict[str, Any]], key: str = "gold") -> bytes | None:
    """Each policy's mean `key` reward (with its standard error) against its KL to the reference."""
    points = {n: p for n, p in policies.items() if key in p and "kl" in p}
    if not points:
        return None
    labels = [(name, (p["kl"], p[key]), plt.cm.tab10(i % 10)) for i, (name, p) in enumerate(points.items())]
    fig, ax = plt.subplots(figsize=(4.9, 3.4))
    for (_, (kl, reward), color), p in zip(labels, points.values(), strict=True):
        ax.errorbar(kl, reward, xerr=p.get("kl_se", 0), yerr=p.get(f"{key}_se", 0), fmt="o", color=color)
    _style(ax, f"{key} reward against KL to the reference", "KL(policy || reference), nats")
    ax.set_ylabel(f"mean {key} reward", fontsize=9)
    fig.tight_layout()
    place_labels(ax, labels)
    return _png(fig)


LABEL_OFFSETS = [
    (6, 4, "left"),
    (6, -12, "left"),
    (-6, 4, "right"),
    (-6, -12, "right"),
    (0, 9, "center"),
    (0, -18, "center"),
    (12, -4, "left"),
    (-12, -4, "right"),
]
"""Where `place_labels` tries a point's label, in order: (dx, dy) points from the point, and the text's alignment."""


def place_labels(ax: Any, labels: Sequence[tuple[str, tuple[float, float], Any]]) -> list[Any]:
    """Annotate each (text, (x, y), color) next to its point, at the first of `LABEL_OFFSETS` where the text overlaps
    neither an earlier label nor any point's marker (or at the least overlap where none is free): policies that
    land close together keep readable names. Returns the annotations."""
    renderer = ax.figure.canvas.get_renderer()
    markers = [_box(*ax.transData.transform(xy), 4) for _, xy, _ in labels]
    placed: list[tuple[float, float, float, float]] = []
    annotations = []
    for text, xy, color in labels:
        best = None
        for dx, dy, ha in LABEL_OFFSETS:
            note = ax.annotate(text, xy, textcoords="offset points", xytext=(dx, dy), ha=ha, fontsize=8, color=color)
            extent = note.get_window_extent(renderer)
            box = (extent.x0, extent.y0, extent.x1, extent.y1)
            overlap = sum(_overlap(box, other) for other in placed + markers)
            if best is None or overlap < best[0]:
                if best is not None:
                    best[1].remove()
                best = (overlap, note, box)
            else:
                note.remove()
            if overlap == 0:
                break
        placed.append(best[2])
        annotations.append(best[1])
    return annotations


def _box(x: float, y: float, r: float) -> tuple[float, float, float, float]:
    return (x - r, y - r, x + r, y + r)


def _overlap(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> float:
    """Area shared by two (x0, y0, x1, y1) boxes."""
    return max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))


def win_rates(policies: dict[str, dict[str, Any]], baseline: str) -> bytes | None:
    """Horizontal bars of each policy's win rate against the baseline, its 95% interval, and the 50% line."""
    rows = [(n, p["win_rate"]) for n, p in policies.items() if p.get("win_rate")]
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(4.9, 0.9 + 0.45 * len(rows)))
    names = [n for n, _ in rows]
    rates = [w["rate"] for _, w in rows]
    errors = [[w["rate"] - w["low"] for _, w in rows], [w["high"] - w["rate"] for _, w in rows]]
    ax.barh(names, rates, xerr=errors, color=[plt.cm.tab10((i + 1) % 10) for i in range(len(rows))], capsize=3)
    ax.axvline(0.5, color="gray", linestyle=":", linewidth=1)
    ax.set_xlim(0, 1)
    ax.invert_yaxis()
    for i, (_, w) in enumerate(rows):
        ax.text(min(w["high"] + 0.02, 0.93), i, f"{w['rate']:.0%}", va="center", fontsize=8)
    _style(ax, f"win rate against {baseline} (ties half, 95% interval)", "win rate")
    fig.tight_layout()
    return _png(fig)


def calibration(report: dict[str, Any]) -> bytes | None:
    """A reward model's reliability diagram: predicted P(chosen > rejected) against how often it was right."""
    bins = [b for b in report.get("bins", []) if b.get("predicted") is not None]
    if not bins:
        return None
    fig, ax = plt.subplots(figsize=(3.8, 3.6))
    ax.plot([0, 1], [0, 1], ":", color="gray", linewidth=1)
    ax.plot([b["predicted"] for b in bins], [b["observed"] for b in bins], "o-", color=PROXY, markersize=4)
    _style(ax, f"reward model calibration (ECE {report.get('ece', float('nan')):.3f})", "predicted P(label)")
    ax.set_ylabel("observed frequency", fontsize=9)
    fig.tight_layout()
    return _png(fig)
