"""`rlhf report` on hand-made run directories: which sections appear for which files, the figures embedded, the
numbers of the over-optimisation text, and the errors."""

from __future__ import annotations

import json
import re
from pathlib import Path

from rlhf.cli import main
from rlhf.report import plots


def write_run(path: Path, metrics: list[dict], **files: object) -> Path:
    path.mkdir(parents=True)
    (path / "config.yaml").write_text("model:\n  path: base\n")
    (path / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    for name, content in files.items():
        (path / name.replace("_", ".", 1)).write_text(json.dumps(content))
    return path


def test_a_watched_online_run_gets_its_over_optimisation_section(tmp_path, capsys):
    """Gold 0.6 -> 0.9 -> 0.5 while the proxy climbs 0.1 -> 0.8 -> 1.2 along KL 0.5, 2, 6: the text names the peak
    (0.900 at KL 2.00) and the end; training curves of reward and KL; no evaluation or reward-model section."""
    rows = [
        {
            "step": s,
            "reward/score": p,
            "objective/kl": k,
            "eval/gold": g,
            "eval/proxy": p,
            "eval/kl": k,
            "grpo/iteration": float(s),
        }  # fmt: skip
        for s, g, p, k in ((1, 0.6, 0.1, 0.5), (2, 0.9, 0.8, 2.0), (3, 0.5, 1.2, 6.0))
    ]
    run = write_run(tmp_path / "grpo", rows)
    assert main(["report", str(run)]) == 0
    assert capsys.readouterr().out.strip() == f"rlhf report: wrote {run / 'report.html'}"
    page = (run / "report.html").read_text()
    assert "<h2>Over-optimisation</h2>" in page and "<h2>Training curves</h2>" in page
    assert "peaked at 0.900 (KL 2.00) and ended at 0.500 (KL 6.00)" in page and "from 0.100 to 1.200" in page
    assert "<h2>Evaluation on held-out prompts</h2>" not in page and "<h2>Reward model</h2>" not in page
    assert len(re.findall(r'src="data:image/png;base64,', page)) == 2


def test_a_directory_of_runs_with_an_evaluation(tmp_path):
    """A reward-model run (with calibration.json) and an eval.json beside it: the evaluation table (win rate with
    its interval, green when above 1/2 beyond doubt), the calibration figure, the sample tables (a repeated prompt
    once among the best and worst answers)."""
    bins = [{"lower": i / 10, "upper": (i + 1) / 10, "count": 4, "predicted": i / 10 + 0.05, "observed": i / 10}
            for i in range(10)]  # fmt: skip
    write_run(tmp_path / "rm", [{"step": 1, "train/loss": 0.7, "eval/accuracy": 0.8}, {"step": 2, "train/loss": 0.6}],
              calibration_json={"ece": 0.05, "bins": bins})  # fmt: skip
    dpo_gold = {"cba": 1.0, "dca": 0.75, "fe": 0.25, "hg": 0.5, "ji": 0.5, "lk": 0.5, "nm": 0.5}  # sft: 0.5
    samples = [{"prompt": [{"role": "user", "content": f"sort: {x}"}], "letters": x,
                "answers": {"sft": {"text": x[:-1], "gold": 0.5}, "dpo": {"text": "".join(sorted(x)), "gold": g},
                            "same": {"text": x[:-1], "gold": 0.5}}}
               for x, g in [("cba", 1.0), *dpo_gold.items()]]  # fmt: skip
    win = {"rate": 0.875, "low": 0.6, "high": 1.0, "wins": 3, "ties": 1, "losses": 0, "n": 4}
    ev = {"prompts": 4, "baseline": "sft", "judge": "gold", "samples": samples,
          "policies": {"sft": {"gold": 0.5, "gold_se": 0.1, "kl": -1e-7, "length": 2.0},
                       "dpo": {"gold": 1.0, "gold_se": 0.0, "kl": 1.5, "length": 3.0, "win_rate": win}}}  # fmt: skip
    (tmp_path / "eval.json").write_text(json.dumps(ev))
    assert main(["report", str(tmp_path), "--out", str(tmp_path / "r.html"), "--title", "Mine"]) == 0
    page = (tmp_path / "r.html").read_text()
    for section in ("Evaluation on held-out prompts", "Reward model", "Training curves", "Sample answers"):
        assert f"<h2>{section}</h2>" in page
    assert '<td class="good">87.5% [60%, 100%]</td>' in page and "<title>Mine</title>" in page
    assert "dpo: its best and worst answers against sft" in page and "sort: dca" in page
    dpo_rows = page.split("dpo: its best and worst answers")[1].split("</table>")[0]
    assert dpo_rows.count("sort: cba") == 1  # a prompt the held-out set repeats is one row
    # only answers that score better (best) or worse (worst) than the baseline's, not the ties
    assert re.findall(r'<td class="l">(best|worst)</td><td class="mono">sort: (\w+)', dpo_rows) == [
        ("best", "cba"), ("best", "dca"), ("worst", "fe")]  # fmt: skip
    assert "No answer of same scores other than sft's." in page
    assert "-0.000" not in page  # the baseline's sampled KL of -1e-7 is 0.000


def test_the_evaluation_note_explains_only_the_columns_shown(tmp_path):
    """An evaluation judged by a reward model alone (no gold function, no reference): the note says what proxy is and
    says nothing of gold or KL."""
    ev = {"prompts": 2, "baseline": "base", "judge": "proxy",
          "policies": {"base": {"proxy": 0.1, "length": 3.0},
                       "dpo": {"proxy": 0.3, "length": 3.0,
                               "win_rate": {"rate": 0.75, "low": 0.2, "high": 1.0, "wins": 1, "ties": 1, "losses": 0,
                                            "n": 2}}}}  # fmt: skip
    (tmp_path / "eval.json").write_text(json.dumps(ev))
    assert main(["report", str(tmp_path)]) == 0
    note = (tmp_path / "report.html").read_text().split("<p class=note>")[1].split("</p>")[0]
    assert note.startswith("2 held-out prompts, greedy answers. Proxy: the reward model")
    assert "Gold" not in note and "KL" not in note and "judged by proxy" in note


def test_constant_panels_are_left_out_and_long_series_smoothed():
    """A fixed KL coefficient draws no panel; an exponential moving average with span 3 (alpha 1/2) by hand."""
    assert plots.smoothed([0.0, 2.0, 2.0], 3) == [0.0, 1.0, 1.5]
    assert plots.training_curves([{"step": s, "objective/kl_coef": 0.05} for s in range(5)]) is None


def test_equal_series_are_one_line_and_kl_per_token_has_its_own_panel():
    """PPO without shaping logs reward/shaped equal to reward/score: one line labelled with both. GRPO's KL term per
    token (~0.4 here) is not drawn on the axis of the KL per answer (~2, its value times the length)."""
    metrics = [{"step": s, "reward/score": 0.1 * s, "reward/shaped": 0.1 * s, "eval/proxy": 0.2 * s,
                "policy/kl": 0.4 * s, "eval/kl": 2.0 * s} for s in range(1, 4)]  # fmt: skip
    assert plots.panel_lines(metrics) == [
        ("reward", [["reward/score", "reward/shaped"], ["eval/proxy"]]),
        ("KL to the reference, nats per answer", [["eval/kl"]]),
        ("KL in the loss, per token", [["policy/kl"]]),
    ]
    metrics[1]["reward/shaped"] = 0.0  # one step apart: two lines
    assert plots.panel_lines(metrics)[0] == ("reward", [["reward/score"], ["reward/shaped"], ["eval/proxy"]])


def test_labels_of_close_policies_do_not_overlap():
    """The demo's policies (gold against KL): dpo, ppo and grpo within 0.4 nats and 0.015 of gold of each other. No
    label may cover another label or any point's marker."""
    points = {"sft": (0.0, 0.748), "dpo": (1.672, 0.905), "ppo": (1.720, 0.890), "grpo": (2.070, 0.898),
              "grpo_overopt": (12.332, 0.554)}  # fmt: skip
    fig, ax = plots.plt.subplots(figsize=(4.9, 3.4))
    for xy in points.values():
        ax.plot(*xy, "o")
    fig.tight_layout()
    notes = plots.place_labels(ax, [(name, xy, "k") for name, xy in points.items()])
    renderer = fig.canvas.get_renderer()
    boxes = [n.get_window_extent(renderer) for n in notes]
    markers = [plots._box(*ax.transData.transform(xy), 4) for xy in points.values()]
    for i, a in enumerate(boxes):
        a = (a.x0, a.y0, a.x1, a.y1)
        assert all(plots._overlap(a, (b.x0, b.y0, b.x1, b.y1)) == 0 for b in boxes[i + 1 :])
        assert all(plots._overlap(a, m) == 0 for m in markers)
    assert [n.get_text() for n in notes] == list(points)
    plots.plt.close(fig)


def test_report_errors_are_one_line(tmp_path, capsys):
    assert main(["report", str(tmp_path / "missing")]) == 1
    assert capsys.readouterr().err.strip() == f"rlhf: error: No such run directory: {tmp_path / 'missing'}"
    assert main(["report", str(tmp_path)]) == 1
    assert "No run directory (config.yaml + metrics.jsonl) or eval.json in" in capsys.readouterr().err
