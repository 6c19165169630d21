"""The real-data results page, ``docs/RESULTS.md``, generated from the run store, never written by hand.

    python -m cdlib pipeline --profile cpu --set dataset=imagefolder:cifar10-jpeg --train-only   # train
    python -m cdlib results --profile cpu --set dataset=imagefolder:cifar10-jpeg                 # the page

writes the page from the finished runs of ``plan(profile)``: the methods of the leak question
(CD-300 with each confusion source) and CD's rivals at its two budgets (200 and 300 paper epochs:
cross-entropy and label smoothing at both, CS-KD, PS-KD) on the student network, every seed, and
as many teachers as seeds. Every verdict compares runs of one budget. It trains nothing (the executors do, resumably: a
killed command picks up where it stopped). Runs not finished yet are listed as missing, so the
page can cover the part of a profile that fitted the time available. Besides the tables, the page
gives the measured time per epoch and a projection of the whole profile's training time.
"""
from __future__ import annotations

import os
import platform
import subprocess
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch

from cdlib import __version__, paths
from cdlib.core import runs as run_store
from cdlib.core.config import TrainConfig
from cdlib.errors import ArgumentParser
from cdlib.experiments import distillation_results as dr
from cdlib.experiments import paper, plans, tables
from cdlib.experiments.profiles import Profile, add_profile_arguments, profile_from_args

# The Table 2 rows the page reports, in Table 2's order: CD at both budgets, what its confusion source
# changes, and the methods it is compared with at its own budget.
RESULTS_METHODS = ("baseline", "ls", "baseline300", "ls300", "cskd", "pskd", "cd200", "cd300", "cd300-test",
                   "cd300-holdout", "cd300-train_eval")
# The verdicts' method comparisons (first beats second?), each between two methods of one budget.
VERDICT_PAIRS = (("cd300", "baseline300"), ("cd300", "ls300"), ("cd300", "pskd"),
                 ("cd200", "baseline"), ("cd200", "ls"), ("cd200", "cskd"))
# The paper's counterpart of a control it lacks, for its difference shown beside ours.
PAPER_COUNTERPART = {"baseline300": "baseline", "ls300": "ls"}
NOTEBOOKS = ("01", "02", "03", "04", "05")
ALPHA = 0.05
# A projection's cost of extra forward passes, in epochs of the network's own training: a forward is
# about a third of a training step (forward + backward = 3 forwards).
FORWARD_SHARE = 1 / 3


def methods(profile: Profile) -> list[str]:
    return [m for m in RESULTS_METHODS if m in plans.table2_methods(profile)]


def plan(profile: Profile) -> list[TrainConfig]:
    """Every run the page reports, in training order: the methods seed by seed, then the teachers
    (as many as seeds), which show whether KD's teachers are stronger than its students."""
    configs = [plans.method_config(profile, m, profile.student_arch, s)
               for s in range(profile.seeds) for m in methods(profile)]
    return configs + plans.teachers(profile)[:profile.seeds]


# ----------------------------------------------------------------------------- measurements

def _model_epoch_seconds(run: run_store.Run) -> pd.Series:
    """Wall time of each epoch (training and every evaluation)."""
    return run.metrics["seconds"]


def _epoch_seconds(run: run_store.Run) -> float:
    """The fastest epoch of a run, per model: on a shared machine the least disturbed one."""
    return float(_model_epoch_seconds(run).min())


def timing_table(profile: Profile, root=None) -> pd.DataFrame:
    """Per (network, width, objective) of the finished runs: runs, epochs, seconds per epoch and model
    (the fastest epoch, and the median), and the training hours they took."""
    rows = []
    for r in run_store.split_finished(plan(profile), root)[0]:
        seconds = _model_epoch_seconds(r)
        rows.append({"network": dr.arch_label(r.config.arch), "width": r.config.width, "objective": r.config.objective,
                     "epochs": r.config.epochs, "fastest": float(seconds.min()), "median": float(seconds.median()),
                     "train s": float(seconds.sum())})
    if not rows:
        return pd.DataFrame(columns=["network", "width", "objective", "runs", "epochs", "s / epoch (fastest)",
                                     "s / epoch (median)", "train h"])
    frame = pd.DataFrame(rows)
    out = frame.groupby(["network", "width", "objective"], sort=False).agg(
        runs=("epochs", "size"), epochs=("epochs", "sum"),
        **{"s / epoch (fastest)": ("fastest", "min"), "s / epoch (median)": ("median", "median"),
           "train h": ("train s", "sum")}).reset_index()
    out["train h"] /= 3600
    out["width"] = [f"{w:g}" for w in out["width"]]
    return out


def _rates(profile: Profile, root=None) -> dict[tuple, float]:
    """Measured seconds per epoch by (arch, width, objective), and by (arch, width) over objectives."""
    found = run_store.split_finished(plan(profile), root)[0]
    rates: dict[tuple, list[float]] = {}
    for r in found:
        for key in ((r.config.arch, r.config.width, r.config.objective), (r.config.arch, r.config.width)):
            rates.setdefault(key, []).append(_epoch_seconds(r))
    return {k: float(min(v)) for k, v in rates.items()}


def projected_seconds(config: TrainConfig, rates: dict[tuple, float], teacher_width: float) -> float:
    """A run's training time from measured rates: its own objective's if measured, else its network's
    cross-entropy rate plus the extra forwards of its objective (KD: the teacher's; CS-KD: a second
    student pass). NaN when the network was not measured."""
    own = rates.get((config.arch, config.width, config.objective))
    if own is not None:
        return own * config.epochs
    base = rates.get((config.arch, config.width, "ce"), rates.get((config.arch, config.width), np.nan))
    extra = 0.0
    if config.objective == "kd":
        teacher = [v for k, v in rates.items() if len(k) == 2 and k[1] == teacher_width and k[0] != config.arch]
        extra = FORWARD_SHARE * (teacher[0] if teacher else np.nan)
    elif config.objective == "cskd":
        extra = FORWARD_SHARE * base
    return (base + extra) * config.epochs


def projection_table(profile: Profile, root=None) -> pd.DataFrame:
    """Projected training time of every notebook's runs (each run counted at its first notebook)."""
    rates = _rates(profile, root)
    teacher_width = profile.teacher_width or profile.width
    rows: dict[str, dict] = {nb: {"notebook": nb, "runs": 0, "epochs": 0, "projected h": 0.0} for nb in NOTEBOOKS}
    for config, used_by in plans.combined_plan(profile, list(NOTEBOOKS)):
        row = rows[used_by[0]]
        row["runs"] += 1
        row["epochs"] += config.epochs
        row["projected h"] += projected_seconds(config, rates, teacher_width) / 3600
    frame = pd.DataFrame(rows.values())
    total = {"notebook": "all", "runs": frame["runs"].sum(), "epochs": frame["epochs"].sum(),
             "projected h": frame["projected h"].sum(skipna=False)}  # blank until every network is measured
    return pd.concat([frame, pd.DataFrame([total])], ignore_index=True)


def accuracy_table(profile: Profile, cells: dict) -> pd.DataFrame:
    """One row per method: seeds, epochs, final / val-selected / test-selected top-1, NLL, ECE."""
    long = dr.table2_long(profile, cells=cells)
    text = lambda row, m: tables.format_mean_std(row[f"{m}_mean"], row[f"{m}_std"])  # noqa: E731
    rows = []
    for _, row in long.iterrows():
        rows.append({"method": row["label"], "n": row["n"],
                     "epochs": plans.method_config(profile, row["method"], row["arch"], 0).epochs,
                     "final top-1": text(row, "final_top1"), "95% CI": row["final_top1_ci95"],
                     **({"val-selected top-1": text(row, "selected_top1")} if profile.validation else {}),
                     "best top-1 (test-selected)": text(row, "best_top1"), "final NLL": text(row, "final_nll"),
                     "final ECE %": text(row, "final_ece")})
    return pd.DataFrame(rows)


def _verdict(profile: Profile, name: str, a: np.ndarray, b: np.ndarray, methods: tuple[str, str]) -> dict:
    """One row: does the first group beat the second (mean final top-1 higher, Welch p < ALPHA)? Only
    between runs of one budget: a row of unequal budgets says so and never holds."""
    t, p, note = dr.welch(a, b)
    same, epochs = dr.budget(profile, *methods)
    holds = same and len(a) and len(b) and a.mean() > b.mean() and bool(p < ALPHA)
    counterparts = tuple(PAPER_COUNTERPART.get(m, m) for m in methods)
    values = [paper.table2(m, profile.student_arch) for m in counterparts]
    return {"question": name, "epochs": epochs,
            "ours (difference)": a.mean() - b.mean() if len(a) and len(b) else np.nan,
            "p (Welch)": dr.format_p(p), "n": f"{len(a)} / {len(b)}",
            "paper (difference)": np.nan if None in values else values[0] - values[1],
            "paper epochs": dr.paper_budget(*counterparts) if None not in values else "",
            "verdict": ("holds here" if holds else "does not hold here") if same else f"not counted: {epochs}",
            "note": note}


def verdicts(profile: Profile, cells: dict) -> pd.DataFrame:
    """The questions these runs answer, each by one rule: the first group's mean final top-1 is higher and
    Welch's two-sided p < 0.05, between runs of one budget. The paper's difference (CIFAR-100, ResNet-18,
    best epoch) stands beside with its own budgets."""
    arch = profile.student_arch
    final = lambda method: dr.summary_values(cells.get((method, arch), []), "final_top1")  # noqa: E731
    rows = [_verdict(profile, f"leak-free {dr.METHOD_LABELS[a]} beats {dr.METHOD_LABELS[b]}", final(a), final(b), (a, b))
            for a, b in VERDICT_PAIRS]
    for method, source in dr.LEAK_FREE_SOURCES.items():
        if method != "cd300" and (method, arch) in cells:
            rows.append(_verdict(profile, f"CD-300 with the {source} source beats the training-batch source",
                                 final(method), final("cd300"), (method, "cd300")))
    for method, source in dr.LEAK_FREE_SOURCES.items():
        rows.append(_verdict(profile, f"the test-set source (leak) beats the {source} source", final("cd300-test"),
                             final(method), ("cd300-test", method)))
    return pd.DataFrame(rows)


def teacher_check(profile: Profile, cells: dict, root=None) -> pd.DataFrame:
    """The setting, not a claim: are KD's teachers more accurate than the students' baselines (final top-1)?"""
    teachers = run_store.split_finished(plans.teachers(profile)[:profile.seeds], root)[0]
    teacher, student = (dr.summary_values(teachers, "final_top1"),
                        dr.summary_values(cells.get(("baseline", profile.student_arch), []), "final_top1"))
    if not len(teacher) or not len(student):
        return pd.DataFrame()
    t, p, note = dr.welch(teacher, student)
    return pd.DataFrame([{
        "teacher": f"{dr.arch_label(profile.teacher_arch)} width {profile.teacher_width or profile.width:g}, "
                   f"{teachers[0].config.epochs} epochs",
        "student baseline": f"{dr.arch_label(profile.student_arch)} width {profile.width:g}, {profile.epochs} epochs",
        "teacher top-1": tables.format_mean_std(*tables.mean_std_ci(teacher)[:2]),
        "baseline top-1": tables.format_mean_std(*tables.mean_std_ci(student)[:2]),
        "difference": teacher.mean() - student.mean(), "p (Welch)": dr.format_p(p),
        "n": f"{len(teacher)} / {len(student)}", "note": note}])


# ----------------------------------------------------------------------------- the page

def _commit() -> str:
    def git(*args):
        return subprocess.run(["git", *args], cwd=paths.REPO, capture_output=True, text=True, timeout=30).stdout.strip()
    try:
        commit = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return "unknown (no git)"
    return (commit or "unknown") + (" with uncommitted changes" if dirty else "")


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return (f"{cpu}, {os.cpu_count()} cores, {device}; Python {platform.python_version()}, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads")


def render(profile: Profile, root=None) -> str:
    configs = plan(profile)
    missing = run_store.split_finished(configs, root)[1]
    cells = dr.table2_runs(profile, root, methods=methods(profile), finished_only=True)
    cells = {k: v for k, v in cells.items() if k[1] == profile.student_arch}
    teachers = teacher_check(profile, cells, root)
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    md = tables.to_markdown
    lines = [
        f"# Results on real data: profile {profile.label}",
        "",
        f"Generated by `python -m cdlib results {profile.cli_args()}` on {now}, commit {_commit()} "
        f"(cdlib {__version__}), from the run store `{Path(root or paths.runs())}`. Machine: {_machine()}. "
        "Do not edit by hand: rerun the command.",
        "",
        f"**This is not the paper's experiment.** The paper trains full-width networks on CIFAR-100 for "
        f"200-300 epochs. These runs train {dr.arch_label(profile.student_arch)} at width {profile.width:g} on "
        f"{profile.dataset} for {profile.epochs} epochs (300-epoch methods scaled alike, to "
        f"{plans.method_epochs(profile, 'cd300')}), "
        + (f"with {profile.validation} training images held out for validation, "
           if profile.validation else "")
        + (f"on a fixed stratified {profile.train_images} of the other training images, "
           if profile.train_images else "on every other training image, ")
        + "so they test whether the paper's comparisons hold in this small setting, not its numbers. "
        "The paper's differences are shown beside ours for scale only.",
        "",
        f"{len(configs) - len(missing)} of the page's {len(configs)} runs are finished"
        + (f"; not trained yet: {', '.join(f'`{m}`' for m in missing)}." if missing else "."),
        "",
        "<details><summary>The resolved profile</summary>", "", "```toml", profile.to_toml().rstrip(), "```",
        "</details>",
        "",
        "## Accuracy and calibration",
        "",
        "Test-set numbers of each method, mean ± sample std over seeds; `95% CI` is the half-width of the "
        "t-interval of the final top-1. "
        + ("`val-selected` is the test top-1 at the epoch of highest validation top-1. " if profile.validation else "")
        + "`best (test-selected)` is the test top-1 at the epoch of highest *test* top-1: selection on the test "
        "set, which is what the paper reports. NLL is the mean test cross-entropy, ECE the expected calibration "
        "error in % (15 bins). The test-set source row is not a held-out measurement.",
        "",
        md(accuracy_table(profile, cells)) if cells else "No run is finished yet.",
        "",
        "## The test-set leak and the training-batch bias",
        "",
        "CD-300 with Q(t) from the test set (the released code) minus CD-300 with each leak-free source. Against "
        "the training batches the difference mixes the leak with the bias of train-mode predictions on images "
        "being fitted; against the held-out validation source it is what the test labels add; the eval-mode "
        "training source removes the train-mode and augmentation part of the bias only.",
        "",
        md(dr.leak_table(profile, cells=cells)) if ("cd300-test", profile.student_arch) in cells else
        "The test-source runs are not finished yet.",
        "",
        "## Verdicts",
        "",
        f"Each row by one rule: the first group's mean **final-epoch** top-1 is higher than the second's and "
        f"Welch's two-sided p < {ALPHA:g} (with fewer than 2 seeds there is no test, and the row does not hold). "
        "Both groups train the same number of epochs (`epochs`): CD-300 is set against the 300-epoch "
        "controls and PS-KD, CD-200 against the 200-epoch methods; a row of unequal budgets would say "
        "\"not counted\" and never hold. No verdict reads a test-selected epoch. `paper (difference)` is the "
        "difference in the paper's Table 2 (CIFAR-100, ResNet-18, best epoch, test-set CD source) where it "
        "reports both numbers, with its budgets in `paper epochs`: the paper has no 300-epoch baseline, so "
        "its CD-300 row against the baseline compares 300 with 200 epochs. Where a row does not hold here, "
        "the paper's claim is not reproduced in this setting by the margin shown.",
        "",
        md(verdicts(profile, cells)) if cells else "No run is finished yet.",
        "",
        "## The setting: are the teachers stronger?",
        "",
        "Not a claim, a precondition of KD (notebooks 02-03): the teachers' final top-1 against the students' "
        "baselines. The teachers train longer by design (the profile's `teacher_epochs`).",
        "",
        md(teachers) if len(teachers) else "The teachers or the baselines are not finished yet.",
        "",
        "## Time on this machine",
        "",
        "Measured: the wall time of one epoch (training, then evaluation on validation and test) per model, "
        "of the finished runs: the fastest epoch and the median. The machine ran other work during some runs; the fastest epoch is the least disturbed.",
        "",
        md(timing_table(profile, root)),
        "",
        "Projected: every run the five notebooks train for this profile (each counted at its first notebook), "
        "at the fastest measured seconds per epoch of its network and objective, or of its network's cross-entropy "
        f"runs plus {FORWARD_SHARE:.2f} of an epoch per extra forward pass (KD's teacher, CS-KD's second "
        "pass) where that objective was not measured. Training only: the notebooks' analyses (Interaction "
        "Tensor, confusion measures) come on top. A blank is a network not measured yet.",
        "",
        md(projection_table(profile, root)),
    ]
    return "\n".join(lines) + "\n"


def write_page(profile: Profile, output: Path, root=None) -> Path:
    from cdlib.core.util import atomic_write_text
    output.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(output, render(profile, root))
    return output


def main(argv: Sequence[str] | None = None) -> Path:
    parser = ArgumentParser(prog="python -m cdlib results", description=__doc__.splitlines()[0])
    add_profile_arguments(parser)
    parser.add_argument("--output", type=Path, default=paths.REPO / "docs" / "RESULTS.md", help="default docs/RESULTS.md")
    args = parser.parse_args(argv)
    profile = profile_from_args(args)
    path = write_page(profile, args.output)
    print(path)
    return path
