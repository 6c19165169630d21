"""List what the notebooks train, without executing them: ``python -m cdlib plan``.

    python -m cdlib plan --profile paper --notebook 01          # runs of notebook 01
    python -m cdlib plan --profile paper --all --status         # every notebook, with the store's state
    python -m cdlib plan --profile paper --all --json > plan.json   # for python -m cdlib executors run

The plans themselves live in ``cdlib.experiments.plans.notebook_plan``; a run shared by several
notebooks is listed once, at its first place (teachers always before their students).
"""
from __future__ import annotations

import json
import sys
import time

from cdlib.core import runs
from cdlib.scaleout import locks
from cdlib.core.config import TrainConfig
from cdlib.experiments.plans import combined_plan, notebook_plan
from cdlib.experiments.profiles import Profile, add_profile_arguments, profile_from_args
from cdlib.errors import ArgumentParser


def available_notebooks(profile: Profile) -> list[str]:
    """Notebook numbers that have a training plan."""
    found = []
    for n in range(1, 100):
        try:
            notebook_plan(profile, f"{n:02d}")
        except ValueError:
            continue
        found.append(f"{n:02d}")
    return found


def run_status(config: TrainConfig) -> str:
    """The run's state in the store: finished, training (by whom), failed, partial, or new."""
    folder = runs.run_dir(config)
    if runs.is_finished(folder):
        return "finished"
    owner = locks.read_lock(folder)
    if owner is not None:
        stale = locks.stale_reason(owner)
        return f"stale lock ({stale})" if stale else f"training on {owner.host} pid {owner.pid}"
    failure = runs.failure(folder)
    if failure:
        return f"failed {time.strftime('%Y-%m-%d %H:%M', time.localtime(failure['time']))}: {failure['error']}"
    done = runs.epochs_done(folder)
    return f"partial ({done}/{config.epochs} epochs)" if done else "new"


def plan_rows(profile: Profile, notebooks: list[str], status: bool = False) -> list[dict]:
    rows = []
    for config, used_by in combined_plan(profile, notebooks):
        row = {"run_id": config.run_id(), "notebooks": used_by, "arch": config.arch, "epochs": config.epochs,
               "objective": config.objective, "objective_args": config.objective_args,
               "teacher": config.objective_args.get("teacher")}
        if status:
            row["status"] = run_status(config)
        row["config"] = config.to_dict()
        rows.append(row)
    return rows


def main(argv=None) -> int:
    parser = ArgumentParser(prog="python -m cdlib plan", description=__doc__.splitlines()[0])
    add_profile_arguments(parser)
    parser.add_argument("--notebook", action="append", default=[], help="notebook number(s), e.g. 01 or 01,03")
    parser.add_argument("--all", action="store_true", help="every notebook with a plan")
    parser.add_argument("--json", action="store_true", help="machine-readable: a list of runs with their configs")
    parser.add_argument("--status", action="store_true", help="add each run's state in the run store")
    args = parser.parse_args(argv)

    profile = profile_from_args(args, announce=not args.json)
    known = available_notebooks(profile)
    notebooks = known if args.all else [n.strip() for arg in args.notebook for n in arg.split(",") if n.strip()]
    if not notebooks:
        parser.error(f"name --notebook NN (one of {', '.join(known)}) or --all")
    unknown = sorted(set(notebooks) - set(known))
    if unknown:
        parser.error(f"no plan for notebook(s) {unknown}; known: {', '.join(known)}")
    rows = plan_rows(profile, notebooks, args.status)

    if args.json:
        json.dump(rows, sys.stdout, indent=1)
        print()
        return 0
    epochs = sum(r["epochs"] for r in rows)
    print(f"profile {profile.name}, notebooks {', '.join(notebooks)}: {len(rows)} runs, {epochs} epochs in all")
    width = max(len(r["run_id"]) for r in rows) if rows else 10
    swidth = max([len(r.get("status", "")) for r in rows] + [6]) if args.status else 0
    print(f"{'run id':<{width}}  {'epochs':>6}  {'objective':<9}  {'notebooks':<14}  "
          + (f"{'status':<{swidth}}  " if args.status else "") + "teacher")
    for r in rows:
        print(f"{r['run_id']:<{width}}  {r['epochs']:>6}  {r['objective']:<9}  {','.join(r['notebooks']):<14}  "
              + (f"{r['status']:<{swidth}}  " if args.status else "") + (r["teacher"] or "-"))
    if args.status:
        counts: dict[str, int] = {}
        for r in rows:
            key = r["status"].split(" ")[0]
            counts[key] = counts.get(key, 0) + 1
        print("status: " + ", ".join(f"{n} {k}" for k, n in sorted(counts.items())))
    return 0

