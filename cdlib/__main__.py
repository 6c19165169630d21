"""``python -m cdlib COMMAND ...``: the command-line tools.

    pipeline   run notebooks 01..05 in order with papermill (cdlib.experiments.pipeline)
    report     rewrite outputs/REPORT.md from the run store   (cdlib.experiments.report)
    results    write docs/RESULTS.md from real-data runs        (cdlib.experiments.results)
    publish    copy the outputs, small, into a folder to commit (cdlib.experiments.publish)
    released   the paper's claims from the authors' artifacts   (cdlib.released.analysis)
    plan       list the runs a notebook trains                 (cdlib.scaleout.plan)
    estimate   how long a profile's training takes here        (cdlib.scaleout.estimate)
    executors  run a plan's runs on local GPUs or Slurm         (cdlib.scaleout.executors)
    train      train one run in a given folder, under its lock (cdlib.scaleout.executors)

A mistake (an unknown profile, a damaged file, a full disk) is reported as one line on
stderr with exit code 2 (``cdlib.errors``); a traceback means a bug in cdlib.
"""
import importlib
import sys

from cdlib.errors import report_user_errors

COMMANDS = {
    "pipeline": "cdlib.experiments.pipeline",
    "report": "cdlib.experiments.report",
    "results": "cdlib.experiments.results",
    "publish": "cdlib.experiments.publish",
    "released": "cdlib.released.analysis",
    "plan": "cdlib.scaleout.plan",
    "estimate": "cdlib.scaleout.estimate",
    "executors": "cdlib.scaleout.executors",
    "train": "cdlib.scaleout.executors:train_main",
}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__, file=sys.stderr)
        return 0 if argv else 2
    if argv[0] not in COMMANDS:
        print(f"python -m cdlib: error: unknown command {argv[0]!r}; choose one of {', '.join(COMMANDS)} "
              f"(see python -m cdlib --help)", file=sys.stderr)
        return 2
    module, _, function = COMMANDS[argv[0]].partition(":")
    return report_user_errors(argv[0], getattr(importlib.import_module(module), function or "main"), argv[1:])


if __name__ == "__main__":
    sys.exit(main())
