"""``hwcompat report RUN [RUN ...]``: rebuild a run's report.html, or compare several runs on one page."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub) -> None:
    p = sub.add_parser("report", help="rebuild a run's report.html; with several runs, one page comparing them",
                       description="One self-contained HTML file (no script, no network): loss curves with resumes "
                                   "marked, learning rate, tokens/s, memory, task metrics before/after with the "
                                   "regression guard, the profile's choices, the plan beside the measured peak, the "
                                   "export's --verify figures. Several runs: curves overlaid, metrics side by side.")
    p.add_argument("runs", nargs="+", metavar="RUN", help="run folders (a `hwcompat train` output_dir)")
    p.add_argument("--out", metavar="FILE", help="where to write (default: RUN/report.html for one run, "
                                                 "./compare.html for several)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from hwcompat.errors import InputError
    from hwcompat.fsutil import atomic_write_text, output_target
    from hwcompat.train.report import load_run, render_compare, render_run, rendered
    from hwcompat.train.rundir import foreign

    runs = [load_run(r) for r in args.runs]
    if len({r.path.resolve() for r in runs}) < len(runs):
        raise InputError("report: a run is named twice; give each run folder once")
    page = rendered(render_run, runs) if len(runs) == 1 else rendered(lambda *rs: render_compare(list(rs)), runs)
    if args.out:
        out, overwrite = Path(args.out), args.overwrite
    elif len(runs) == 1:
        out = runs[0].path / "report.html"
        if foreign(runs[0].path, ["report.html"]):
            raise InputError(f"{out} exists and hwcompat did not write it; give --out FILE (nothing was written)")
        overwrite = True  # the run's own page, ours to rebuild
    else:
        out, overwrite = Path("compare.html"), args.overwrite
    with output_target(out, "hwcompat report", overwrite) as target:
        atomic_write_text(target, page)
    print(f"wrote {out}")
    return 0
