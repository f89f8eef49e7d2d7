"""`rlhf report RUN_DIR... [--out FILE.html]`: the report of one or more run directories (`rlhf.report.page`)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from rlhf.runtime.run_dir import atomic_write_text

REPORT_FILE = "report.html"


def write_report(paths: Sequence[Path], out: Path | None = None, *, title: str = "rlhf report") -> Path:
    """Build the page for `paths` and write it (atomically) to `out`, default `<first path>/report.html`."""
    from rlhf.report.page import build_report

    out = out or Path(paths[0]) / REPORT_FILE
    page = build_report([Path(p) for p in paths], title=title)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, page)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="rlhf report",
        description="Plots and one self-contained HTML page (figures embedded, no network) from run directories: "
        "training curves, the policy evaluation (eval.json), over-optimisation, reward-model calibration, samples.",
        allow_abbrev=False,
    )
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="a run directory, or one holding run directories")
    parser.add_argument("--out", metavar="FILE.html", help=f"where to write the page (default RUN_DIR/{REPORT_FILE})")
    parser.add_argument("--title", default="rlhf report", help="the page title")
    args = parser.parse_args(sys.argv[1:] if argv is None else list(argv))
    out = write_report([Path(p) for p in args.runs], Path(args.out) if args.out else None, title=args.title)
    print(f"rlhf report: wrote {out}")
    return 0
