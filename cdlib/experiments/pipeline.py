"""Execute the notebooks in order with papermill: ``python -m cdlib pipeline [--profile P] [--set K=V ...] [--only 01,03]``.

Each notebook gets the same parameters (profile, its overrides, data set, data root,
device) and is written, executed, to ``outputs/notebooks/``. With ``--download`` (which
``make reproduce`` passes) a missing CIFAR-10/100 is first downloaded into the data root. The pipeline stops at the first
failing notebook and prints the failing cell and its error. Training results are
cached in the run store, so rerunning after a failure or an interruption only
redoes what is missing.

``--executor local|slurm`` first trains the plans of the selected notebooks
(``cdlib.scaleout.plan``) on the local GPUs or as Slurm jobs (``cdlib.scaleout.executors``), waits for
them, and then executes the notebooks, which find every run finished and only
analyse. The default, ``inprocess``, just runs the notebooks (they train as they go).
See docs/scale-out.md.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

from cdlib import paths
from cdlib.errors import ArgumentParser, ConfigError


def notebooks(only: list[str] | None = None) -> list[Path]:
    found = sorted(paths.NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))
    if only:
        found = [nb for nb in found if nb.name[:2] in only]
        missing = set(only) - {nb.name[:2] for nb in found}
        if missing:
            raise ConfigError(f"no notebook numbered {sorted(missing)} in {paths.NOTEBOOKS}; "
                              f"choose from {sorted({nb.name[:2] for nb in paths.NOTEBOOKS.glob('[0-9][0-9]_*.ipynb')})}")
    return found


def run_notebook(notebook: Path, parameters: dict, kernel: str | None = None) -> Path:
    import papermill

    out_dir = paths.executed_notebooks()
    out_dir.mkdir(parents=True, exist_ok=True)
    output = out_dir / notebook.name
    papermill.execute_notebook(str(notebook), str(output), parameters=parameters, kernel_name=kernel,
                               cwd=str(paths.NOTEBOOKS), progress_bar=False, log_output=True)
    return output


def train_plans(args, numbers: list[str]) -> bool:
    """Train every run the selected notebooks need with the chosen executor; False if any failed."""
    from cdlib.scaleout.executors import execute, executor_from_args
    from cdlib.experiments.plans import combined_plan
    from cdlib.scaleout.plan import available_notebooks
    from cdlib.experiments.profiles import profile_from_args

    profile = profile_from_args(args, announce=False)
    planned = [n for n in numbers if n in available_notebooks(profile)]
    configs = [config for config, _ in combined_plan(profile, planned)]
    print(f"training {len(configs)} runs of notebooks {', '.join(planned)} with the {args.executor} executor", flush=True)
    report = execute(configs, executor_from_args(args, args.data_root, args.device), retries=args.retries)
    print(report.summary(), flush=True)
    if not report.ok:
        print("\nFAILED: not every run could be trained; no notebook was executed.", file=sys.stderr)
    return report.ok


def main(argv=None) -> int:
    from cdlib.experiments.profiles import add_profile_arguments, overrides_dict, profile_from_args

    parser = ArgumentParser(prog="python -m cdlib pipeline", description=__doc__.splitlines()[0])
    add_profile_arguments(parser)
    parser.add_argument("--only", default=None, help="comma-separated notebook numbers, e.g. 01,03")
    parser.add_argument("--data-root", default=None, help="folder holding the data sets (default $CDLIB_DATA)")
    parser.add_argument("--download", action="store_true",
                        help="download a missing CIFAR-10/100 into the data root first (needs internet)")
    parser.add_argument("--device", default=None, help="cpu | cuda | cuda:1 (default: cuda if available)")
    parser.add_argument("--released", default=None,
                        help="a local copy of the authors' artifacts: notebooks 03-05 also show their numbers")
    parser.add_argument("--kernel", default=None, help="Jupyter kernel name (default: the notebook's)")
    parser.add_argument("--train-only", action="store_true", help="train the notebooks' plans, execute no notebook")
    from cdlib.scaleout.executors import add_executor_arguments
    add_executor_arguments(parser)
    args = parser.parse_args(argv)

    from papermill.exceptions import PapermillExecutionError

    from cdlib.core.readers import ensure_downloaded
    profile = profile_from_args(args)  # announces what 'auto' chose
    args.profile = profile.source  # the notebooks and the executors resolve the same profile
    if args.download:
        ensure_downloaded(profile.dataset, args.data_root)
    parameters = {"profile": profile.source, "overrides": overrides_dict(args.overrides), "dataset": args.dataset,
                  "data_root": args.data_root, "device": args.device, "released": args.released}
    selected = notebooks(args.only.split(",") if args.only else None)
    print(f"pipeline: {len(selected)} notebooks, profile {profile.label}, outputs in {paths.outputs()}")
    if args.executor != "inprocess" or args.train_only:
        if not train_plans(args, [nb.name[:2] for nb in selected]):
            return 1
        if args.train_only:
            return 0
    for nb in selected:
        start = time.perf_counter()
        print(f"-> {nb.name}", flush=True)
        try:
            output = run_notebook(nb, parameters, args.kernel)
        except PapermillExecutionError as err:
            print(f"\nFAILED: {nb.name}, cell {err.cell_index}:\n{'-' * 60}\n{err.source}\n{'-' * 60}\n"
                  f"{err.ename}: {err.evalue}\n\nExecuted copy with the traceback: "
                  f"{paths.executed_notebooks() / nb.name}\nFix the cause and rerun; finished runs are kept.",
                  file=sys.stderr)
            return 1
        print(f"   done in {time.perf_counter() - start:.0f} s -> {output}", flush=True)
    print(f"pipeline finished: figures in {paths.figures()}, tables in {paths.tables()}")
    return 0

