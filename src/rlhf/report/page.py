"""One self-contained HTML page from run directories: every figure embedded as a base64 PNG, inline CSS, no
script and nothing fetched, so it opens offline and can be mailed as one file.

Sections, each shown when there is something for it:

    summary             what `rlhf demo` found (summary.json): the task, the reward model against its labellers
    evaluation          eval.json: the table of policies (gold, proxy, KL, win rate ...), win rates, gold vs KL
    over-optimisation   runs that evaluated their policy during training: gold and proxy against KL
    reward model        held-out accuracy and the reliability diagram (calibration.json)
    training curves     every run: loss, reward, KL, KL coefficient, entropy, clip fraction, accuracy, margin, ...
    samples             answers of every policy to the first prompts; each policy's best and worst against the
                        baseline; what the over-optimised policy writes

Run directories are read through `rlhf.runtime.run_dir` only.
"""

from __future__ import annotations

import base64
import datetime
import html
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rlhf.evaluation.stats import fixed
from rlhf.report import plots
from rlhf.runtime.run_dir import EVAL_FILE, is_run_dir, read_run

SUMMARY_FILE = "summary.json"

CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 2em auto; max-width: 1100px;
       color: #222; padding: 0 1em; line-height: 1.45; }
h1 { margin-bottom: 0.1em; } h2 { border-bottom: 1px solid #ddd; padding-bottom: 0.2em; margin-top: 1.8em; }
.sub { color: #666; margin-top: 0; } .note { color: #555; font-size: 0.92em; max-width: 56em; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.92em; }
th, td { border-bottom: 1px solid #e3e3e3; padding: 0.3em 0.7em; text-align: right; }
th { background: #f6f6f6; } td.l, th.l { text-align: left; }
td.mono { font-family: Menlo, Consolas, monospace; text-align: left; white-space: pre; }
.good { color: #1e8449; font-weight: 600; } .bad { color: #c0392b; }
img { max-width: 100%; } .figs { display: flex; flex-wrap: wrap; gap: 1.2em; align-items: flex-start; }
.kpi { display: inline-block; border: 1px solid #e3e3e3; border-radius: 6px; padding: 0.5em 1em;
       margin: 0 0.6em 0.6em 0; }
.kpi b { font-size: 1.3em; display: block; }
"""


def _img(png: bytes | None, alt: str) -> str:
    if png is None:
        return ""
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def _esc(value: Any) -> str:
    return html.escape(str(value))


def prompt_text(prompt: Any) -> str:
    """A prompt as the user wrote it: a string, or the last user turn of a message list."""
    if isinstance(prompt, list):
        users = [m.get("content", "") for m in prompt if m.get("role") == "user"]
        return users[-1] if users else json.dumps(prompt)
    return str(prompt)


def _fmt(value: Any, digits: int = 3) -> str:
    return fixed(value, digits) if isinstance(value, int | float) else "-"


def collect(paths: Sequence[Path]) -> dict[str, Any]:
    """The runs (each path, or the run directories right below it, in the order they were made), the policy
    evaluations (eval.json) and the demo summaries found there."""
    runs: list[dict[str, Any]] = []
    evaluations, summaries = [], []
    for path in paths:
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(2, "No such run directory", str(path))
        found = [path] if is_run_dir(path) else [p for p in path.iterdir() if p.is_dir() and is_run_dir(p)]
        found.sort(key=lambda p: (p / "config.yaml").stat().st_mtime)
        runs += [read_run(p) | {"name": p.name} for p in found]
        if (path / EVAL_FILE).is_file():
            evaluations.append(json.loads((path / EVAL_FILE).read_text()) | {"source": str(path / EVAL_FILE)})
        if (path / SUMMARY_FILE).is_file():
            summaries.append(json.loads((path / SUMMARY_FILE).read_text()))
    return {"runs": runs, "evaluations": evaluations, "summaries": summaries}


# ---------------------------------------------------------------------------------------------- sections


def summary_section(summary: dict[str, Any]) -> str:
    rm, policies, base = summary.get("reward_model", {}), summary.get("policies", {}), summary.get("baseline")
    kpis = []
    if base in policies:
        kpis.append((f"{base}: gold", _fmt(policies[base].get("gold"))))
    for name, p in policies.items():
        if p.get("win_rate"):
            kpis.append((f"{name}: gold / win rate vs {base}", f"{_fmt(p.get('gold'))} / {p['win_rate']['rate']:.0%}"))
    if "accuracy" in rm:
        kpis.append(("reward model: held-out accuracy", _fmt(rm["accuracy"])))
    if "labeller_agreement" in summary:
        kpis.append(("labellers' own agreement with gold", _fmt(summary["labeller_agreement"])))
    boxes = "".join(f'<span class="kpi"><b>{_esc(v)}</b>{_esc(k)}</span>' for k, v in kpis)
    text = f"<p class=note>{_esc(summary['story'])}</p>" if summary.get("story") else ""
    seconds = summary.get("seconds")
    timing = ""
    if seconds:
        parts = ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items())
        timing = f"<p class=note>Wall-clock time: {_esc(parts)} (total {sum(seconds.values()):.0f} s).</p>"
    return f"<h2>Summary</h2>{text}<div>{boxes}</div>{timing}"


def evaluation_section(ev: dict[str, Any]) -> str:
    policies, base = ev["policies"], ev.get("baseline")
    columns = [("gold", "gold reward"), ("proxy", "proxy (RM)"), ("kl", "KL to reference"), ("win_rate", "win rate"),
               ("length", "length"), ("eos_rate", "EOS rate"), ("distinct_2", "distinct-2"),
               ("repetition", "rep-2")]  # fmt: skip
    shown = [(k, t) for k, t in columns if any(k in p for p in policies.values())]
    head = "".join(f"<th>{_esc(t)}</th>" for _, t in shown)
    best_gold = max((p.get("gold", float("-inf")) for p in policies.values()), default=None)
    body = []
    for name, p in policies.items():
        cells = []
        for key, _ in shown:
            if key == "win_rate":
                w = p.get("win_rate")
                cls = "good" if w and w["low"] > 0.5 else "bad" if w and w["high"] < 0.5 else ""
                text = (
                    f"{w['rate']:.1%} [{w['low']:.0%}, {w['high']:.0%}]" if w else "baseline" if name == base else "-"
                )
                cells.append(f'<td class="{cls}">{_esc(text)}</td>')
            elif key in ("gold", "proxy", "kl") and key in p:
                cls = "good" if key == "gold" and p[key] == best_gold else ""
                cells.append(f'<td class="{cls}">{_fmt(p[key])} &plusmn; {_fmt(p.get(key + "_se", 0))}</td>')
            else:
                cells.append(f"<td>{_fmt(p.get(key))}</td>")
        body.append(f'<tr><td class="l">{_esc(name)}</td>{"".join(cells)}</tr>')
    keys = {k for k, _ in shown}
    notes = [
        f"{ev['prompts']} held-out prompts, greedy answers.",
        "Gold: the task's own reward function (what we want)." if "gold" in keys else "",
        "Proxy: the reward model trained from the labels (what RL optimised)." if "proxy" in keys else "",
        "KL: from each policy's own samples (temperature 1), in nats per answer." if "kl" in keys else "",
        f"Win rate: against {_esc(base)}, judged by {_esc(ev.get('judge'))}, ties counted half, with a 95% interval "
        "(green: above 50% beyond doubt)."
        if base
        else "",
        "Length in tokens; rep-2: share of repeated token bigrams within an answer.",
    ]
    note = " ".join(n for n in notes if n)
    figs = plots.win_rates(policies, base) if base else None, plots.policy_scatter(policies)
    return (
        f'<h2>Evaluation on held-out prompts</h2><table><tr><th class="l">policy</th>{head}</tr>{"".join(body)}'
        f'</table><p class=note>{note}</p><div class="figs">{_img(figs[0], "win rates")}'
        f"{_img(figs[1], 'gold against KL')}</div>"
    )


def over_optimisation_section(runs: list[dict[str, Any]]) -> str:
    parts = []
    for run in runs:
        png = plots.over_optimisation(run["metrics"])
        if png is None:
            continue
        rows = [m for m in run["metrics"] if "eval/gold" in m]
        peak = max(rows, key=lambda m: m["eval/gold"])
        last = rows[-1]
        note = (
            f"Run <b>{_esc(run['name'])}</b> evaluated its policy on held-out prompts during training. The gold reward "
            f"peaked at {peak['eval/gold']:.3f} (KL {peak['eval/kl']:.2f}) and ended at {last['eval/gold']:.3f} "
            f"(KL {last['eval/kl']:.2f}), while the proxy reward went from {rows[0]['eval/proxy']:.3f} to "
            f"{last['eval/proxy']:.3f}: past the peak, the policy learns what the reward model overrates, not what "
            "the labellers meant (Gao et al. 2023). The KL penalty and early stopping on the hacking signals "
            "(<code>stop_when</code>) are the guards against it."
        )
        samples = [s for s in run["samples"] if s.get("iteration") == run["samples"][-1].get("iteration")]
        table = "".join(
            f'<tr><td class="mono">{_esc(prompt_text(s["prompt"]))}</td><td class="mono">{_esc(s["response"])}</td>'
            f"<td>{_fmt(s.get('score'))}</td></tr>"
            for s in samples[:6]
        )
        sample_html = (
            f'<p class=note>What it writes at the end (training samples, proxy score):</p><table><tr><th class="l">'
            f'prompt</th><th class="l">response</th><th>proxy</th></tr>{table}</table>'
            if table
            else ""
        )
        parts.append(f"{_img(png, 'over-optimisation')}<p class=note>{note}</p>{sample_html}")
    return "<h2>Over-optimisation</h2>" + "".join(parts) if parts else ""


def reward_model_section(runs: list[dict[str, Any]], summary: dict[str, Any] | None) -> str:
    parts = []
    for run in runs:
        if run["calibration"] is None:
            continue
        last = next((m for m in reversed(run["metrics"]) if "eval/accuracy" in m), {})
        rm = (summary or {}).get("reward_model", {})
        facts = [f"held-out accuracy against the labels {_fmt(last.get('eval/accuracy'))}"]
        if "gold_accuracy" in rm:
            facts.append(f"against gold {_fmt(rm['gold_accuracy'])}")
        if summary and "labeller_agreement" in summary:
            facts.append(f"the labellers' own agreement with gold {_fmt(summary['labeller_agreement'])}")
        facts.append(f"margin {_fmt(last.get('eval/margin'))}, ECE {_fmt(run['calibration'].get('ece'))}")
        parts.append(
            f"<h3>{_esc(run['name'])}</h3><p class=note>{_esc('; '.join(facts))}. The labels are noisy, so accuracy "
            "against them is bounded by the labellers' agreement with each other.</p>"
            f"{_img(plots.calibration(run['calibration']), 'calibration')}"
        )
    return "<h2>Reward model</h2>" + "".join(parts) if parts else ""


def curves_section(runs: list[dict[str, Any]]) -> str:
    parts = []
    for run in runs:
        png = plots.training_curves(run["metrics"])
        if png is None:
            continue
        model = run["config"].get("model", {}).get("path", "")
        steps = run["metrics"][-1]["step"] if run["metrics"] else 0
        parts.append(
            f"<h3>{_esc(run['name'])}</h3><p class=note>{_esc(run['path'])}: {steps} optimizer steps from "
            f"{_esc(model)}.</p>{_img(png, run['name'] + ' training curves')}"
        )
    return "<h2>Training curves</h2>" + "".join(parts) if parts else ""


def samples_section(ev: dict[str, Any], rows: int = 8) -> str:
    samples, base = ev.get("samples", []), ev.get("baseline")
    if not samples:
        return ""
    names = list(samples[0]["answers"])
    key = "gold" if "gold" in samples[0]["answers"][names[0]] else "proxy"

    def cell(answer: dict[str, Any]) -> str:
        score = f" <small>({answer[key]:.2f})</small>" if key in answer else ""
        return f'<td class="mono">{_esc(answer["text"]) or "&empty;"}{score}</td>'

    head = "".join(f'<th class="l">{_esc(n)}</th>' for n in names)
    body = "".join(
        f'<tr><td class="mono">{_esc(prompt_text(s["prompt"]))}</td>{"".join(cell(s["answers"][n]) for n in names)}'
        "</tr>"
        for s in samples[:rows]
    )
    out = f'<h2>Sample answers</h2><p class=note>Greedy answers ({key} in brackets).</p><table><tr><th class="l">' \
          f'prompt</th>{head}</tr>{body}</table>'  # fmt: skip
    if base in names and key in samples[0]["answers"][base]:
        for name in (n for n in names if n != base):
            # one row per distinct prompt (held-out sets of short prompts repeat some)
            distinct = {prompt_text(s["prompt"]): s for s in samples}.values()

            def gain(s: dict[str, Any], name: str = name) -> float:
                return s["answers"][name][key] - s["answers"][base][key]

            ranked = sorted(distinct, key=gain)
            chosen = [("best", s) for s in ranked[::-1][:3] if gain(s) > 0]
            chosen += [("worst", s) for s in ranked[:3] if gain(s) < 0]
            heading = f"<h3>{_esc(name)}: its best and worst answers against {_esc(base)}</h3>"
            if not chosen:
                out += f"{heading}<p class=note>No answer of {_esc(name)} scores other than {_esc(base)}'s.</p>"
                continue
            body = "".join(
                f'<tr><td class="l">{label}</td><td class="mono">{_esc(prompt_text(s["prompt"]))}</td>'
                f"{cell(s['answers'][name])}{cell(s['answers'][base])}</tr>"
                for label, s in chosen
            )
            out += (
                f'{heading}<table><tr><th></th><th class="l">prompt</th><th class="l">{_esc(name)}</th>'
                f'<th class="l">{_esc(base)}</th></tr>{body}</table>'
            )
    return out


def build_report(paths: Sequence[Path], *, title: str = "rlhf report") -> str:
    """The whole page for these run directories (see the module docstring)."""
    found = collect(paths)
    runs, summary = found["runs"], (found["summaries"] or [None])[0]
    if not runs and not found["evaluations"]:
        raise FileNotFoundError(2, "No run directory (config.yaml + metrics.jsonl) or eval.json in", str(paths[0]))
    sections = [summary_section(summary)] if summary else []
    for ev in found["evaluations"]:
        sections.append(evaluation_section(ev))
    sections.append(over_optimisation_section(runs))
    sections.append(reward_model_section(runs, summary))
    sections.append(curves_section(runs))
    for ev in found["evaluations"]:
        sections.append(samples_section(ev))
    when = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    where = ", ".join(str(p) for p in paths)
    return (
        f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{_esc(title)}</title>'
        f"<style>{CSS}</style></head><body><h1>{_esc(title)}</h1><p class=sub>{_esc(where)} &middot; {when}</p>"
        + "".join(s for s in sections if s)
        + "</body></html>\n"
    )
