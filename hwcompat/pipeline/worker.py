"""Entry point of the training process: ``python -m hwcompat.pipeline.worker RUN_DIR [--resume]``.

Started by ``hwcompat train`` with the profile environment already set, so
torch is first imported here, after the allocator and vendor flags exist.
The recipe runs first and ends at summary.json; with ``export: gguf`` and no
task metric regressed, the export chain follows in the same process, under
the same signal handler.
"""

from __future__ import annotations

import sys
from pathlib import Path

from hwcompat.errors import HwcompatError
from hwcompat import envvars
from hwcompat.choices import Export


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    resume = "--resume" in args
    paths = [a for a in args if not a.startswith("--")]
    if len(paths) != 1:
        print("usage: python -m hwcompat.pipeline.worker RUN_DIR [--resume]", file=sys.stderr)
        return 2
    from hwcompat.train.library_logs import quiet_library_loggers

    quiet_library_loggers()
    from hwcompat.train.loop import run
    from hwcompat.train.stopping import SecondInterrupt, Signals

    # From the first line on, a signal is a clean exit with a true message: one handler for the whole life of
    # the process (load, evals, steps, adapter, export) saves what exists.
    signals = Signals()
    try:
        code = run(Path(paths[0]), resume=resume, signals=signals)
        return export_after_training(Path(paths[0]), signals) if code == 0 else code
    except HwcompatError as exc:
        print(f"hwcompat: error: {exc}", file=sys.stderr)
        if getattr(exc, "quiet_exit", False):  # out of host memory: the interpreter's teardown would print dozens
            import os                            # of "Exception ignored" lines; every file is written atomically

            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(exc.exit_code)
        return exc.exit_code
    except SecondInterrupt:
        print("hwcompat: interrupted (second Ctrl-C); no new checkpoint written"
              + ("; the earlier checkpoints are untouched" if resume else ""), file=sys.stderr)
        return 130
    except KeyboardInterrupt as exc:  # Terminated (any signal) before the first step: load or first eval
        kept = ("the run's checkpoints are untouched: resume again with --resume" if resume else
                "no step was made, so there is nothing to save: run the same command again to start")
        print(f"hwcompat: {'interrupted' if getattr(exc, 'exit_code', 130) == 130 else 'terminated'} before "
              f"training started (model load or first eval); {kept}", file=sys.stderr)
        return getattr(exc, "exit_code", 130)
    finally:
        signals.restore()


def export_after_training(run_dir: Path, signals) -> int:
    """export=gguf: the export chain on this machine's run folder, unless a task metric regressed; 0 otherwise.

    Runs after the process group is closed, so a long merge never holds other ranks in a collective."""
    from hwcompat import summary as summary_file
    from hwcompat.fsutil import Terminated
    from hwcompat.pipeline.export_chain import export_run
    from hwcompat.train.outputs import write_report
    from hwcompat.train.spec import load_spec

    cfg = load_spec(run_dir / "run.json").config
    if cfg.export != Export.gguf or int(envvars.get("LOCAL_RANK", default="0")) != 0:
        return 0
    summary = summary_file.read(run_dir)
    if summary is not None and summary.regressed and not cfg.force:
        _say("hwcompat: error: export refused: a task metric regressed (above); the trained weights are kept in "
             f"{run_dir / summary.output}. Export anyway with --force (or force=true), or fix the data and train again")
        return 1
    try:
        with signals.at_once():
            code = export_run(run_dir, cfg, _say)
        write_report(run_dir, _say)  # again, with the export's --verify figures
        return code
    except Terminated:
        _say(f"\ninterrupted during the export: training finished and the adapter is saved in {run_dir / 'adapter'}; "
             f"the export left nothing half-written. Export it with: hwcompat merge {run_dir} --out "
             f"{run_dir / 'merged'} && hwcompat export {run_dir / 'merged'} --gguf {run_dir / 'model.gguf'} --type "
             f"{cfg.export_type} --ollama")
        return signals.exit_code()


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
