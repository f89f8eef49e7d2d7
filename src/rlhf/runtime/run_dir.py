"""The run directory's plain files (config.yaml, the step-keyed JSON-lines logs) and reading them back.

`metrics.jsonl` holds only values that are a deterministic function of the seed and the data, so two runs
of the same config (or a run and its resumed twin) produce byte-identical files. Wall-clock figures
(throughput, elapsed time) are routed to `perf.jsonl` instead: every key in the `perf/` namespace goes there.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from tqdm.auto import tqdm

from rlhf.config import LoggingConfig
from rlhf.config_loader import config_yaml

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
PERF_FILE = "perf.jsonl"
SAMPLES_FILE = "samples.jsonl"
STEP_LOGS = (METRICS_FILE, PERF_FILE, SAMPLES_FILE)
"""Logs whose lines carry a "step" key; a resume truncates them to the restored step."""
PERF_PREFIX = "perf/"
CALIBRATION_FILE = "calibration.json"
"""Reward-model runs: the reliability bins of the latest held-out evaluation."""
EVAL_FILE = "eval.json"
"""A policy evaluation (`rlhf eval --policy ... --out`; `rlhf demo` writes one beside its runs)."""


def atomic_write_text(path: Path, text: str) -> None:
    """Write a whole file through a temporary sibling and a rename, so readers never see half of it."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_config(run_dir: Path, config_dict: dict[str, Any]) -> None:
    atomic_write_text(run_dir / CONFIG_FILE, config_yaml(config_dict))


def truncate_step_log(path: Path, max_step: int) -> None:
    """Keep the lines of a JSON-lines log whose "step" is <= max_step (lines without a step are kept).

    A line that does not parse (torn by a crash mid-write) is dropped. Rewritten atomically.
    """
    if not path.is_file():
        return
    kept = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if not line.endswith("\n"):  # a torn last line that happens to parse: rewrite it whole
                line += "\n"
            if not isinstance(record, dict) or record.get("step", max_step) <= max_step:
                kept.append(line)
    atomic_write_text(path, "".join(kept))


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The objects of a JSON-lines file (none if it is missing); a torn last line is left out."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return rows


def is_run_dir(path: Path) -> bool:
    """A training run's directory: it has a config.yaml and a metrics.jsonl."""
    return (path / CONFIG_FILE).is_file() and (path / METRICS_FILE).is_file()


def read_run(path: Path) -> dict[str, Any]:
    """What a report needs of a run directory: its `metrics`, `samples` (lists of dicts), `config` (dict), the
    reward model's `calibration` (or None), and whether it has a `final/` model."""
    from rlhf.config_loader import read_yaml

    calibration = path / CALIBRATION_FILE
    return {
        "path": path,
        "config": read_yaml(path / CONFIG_FILE),
        "metrics": read_jsonl(path / METRICS_FILE),
        "samples": read_jsonl(path / SAMPLES_FILE),
        "calibration": json.loads(calibration.read_text()) if calibration.is_file() else None,
        "final": (path / "final").is_dir(),
    }


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists and other values become strings (for tracker hparams)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        elif v is None or isinstance(v, (bool, int, float, str)):
            out[key] = v
        else:
            out[key] = str(v)
    return out


def json_safe(value: Any) -> Any:
    """`value` with every non-finite float as the string "NaN", "Infinity" or "-Infinity", so that the line is
    valid JSON (Python's json writes bare NaN, which is not)."""
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


class JsonlWriter:
    """Appends one JSON object per line and flushes each, so a crash loses at most the line being written.
    Non-finite floats are written as strings (`json_safe`): every line is valid JSON."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._f: IO[str] | None = None

    def write(self, record: dict[str, Any]) -> None:
        if self._f is None:
            self._f = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - kept open across calls
        self._f.write(json.dumps(json_safe(record), allow_nan=False) + "\n")
        self._f.flush()

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


class RunLog:
    """What the main process writes while training: metrics.jsonl, perf.jsonl, trackers, the progress bar.

    On other processes every method is a no-op, so callers need not check the rank.
    """

    def __init__(
        self,
        run_dir: Path,
        logging: LoggingConfig,
        total_steps: int,
        *,
        enabled: bool,
        tracker_log: Callable[..., None] | None = None,
    ) -> None:
        self.run_dir, self.enabled, self.progress, self.total_steps = run_dir, enabled, logging.progress, total_steps
        self.tracker_log = tracker_log
        self.metrics = JsonlWriter(run_dir / METRICS_FILE)
        self.perf = JsonlWriter(run_dir / PERF_FILE)
        self.bar: tqdm | None = None
        self._t_start = self._t_last = time.perf_counter()
        self._step_last = 0

    def start(self, step: int, *, fresh: bool) -> None:
        """Training (re)starts after `step`: cut every step log back to it; a fresh start empties them (a
        killed run's step-0 lines would otherwise be written twice)."""
        if self.enabled:
            for name in STEP_LOGS:
                truncate_step_log(self.run_dir / name, -1 if fresh else step)
        self._t_start = self._t_last = time.perf_counter()
        self._step_last = step

    def has_metrics(self) -> bool:
        """Whether metrics.jsonl already holds a line (after `start` cut it back)."""
        path = self.run_dir / METRICS_FILE
        return self.enabled and path.is_file() and path.stat().st_size > 0

    def throughput(self, step: int, samples_per_step: int, units: float) -> dict[str, float]:
        """Wall-clock `perf/*` figures since the previous call; `units` were processed in that time."""
        now = time.perf_counter()
        steps, elapsed = step - self._step_last, max(now - self._t_last, 1e-9)
        self._t_last, self._step_last = now, step
        return {
            "perf/step_time_s": elapsed / max(steps, 1),
            "perf/samples_per_s": samples_per_step * steps / elapsed,
            "perf/units_per_s": units / elapsed,
            "perf/elapsed_s": now - self._t_start,
        }

    def advance(self, step: int) -> None:
        """One optimizer step done; `step` is the new count."""
        if self.bar is None:
            self.bar = tqdm(
                total=self.total_steps,
                initial=step - 1,
                desc="train",
                dynamic_ncols=True,
                disable=not (self.enabled and self.progress),
            )
        self.bar.update(1)

    def log(self, values: dict[str, float], step: int) -> None:
        """Keys under `perf/` go to perf.jsonl, all others to metrics.jsonl; all of them to the trackers."""
        if not self.enabled:
            return
        deterministic = {k: v for k, v in values.items() if not k.startswith(PERF_PREFIX)}
        perf = {k: v for k, v in values.items() if k.startswith(PERF_PREFIX)}
        if deterministic:
            self.metrics.write({"step": step, **deterministic})
        if perf:
            self.perf.write({"step": step, **perf})
        if self.tracker_log is not None:
            self.tracker_log(values, step=step)
        if self.bar is not None and "train/loss" in values:
            postfix = {"loss": f"{values['train/loss']:.4g}"}
            if "perf/samples_per_s" in values:
                postfix["samples/s"] = f"{values['perf/samples_per_s']:.3g}"
            self.bar.set_postfix(postfix, refresh=False)

    def log_perf(self, values: dict[str, float], step: int) -> None:
        if self.enabled:
            self.perf.write({"step": step, **values})

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self.metrics.close()
        self.perf.close()
