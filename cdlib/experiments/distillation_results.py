"""Results of knowledge distillation (notebook 02) and Confusion Distillation (notebook 05).

Everything here reads finished runs from the run store (``cdlib.core.runs``) and turns
them into tables, tests and claims; nothing trains. The configs come from
``cdlib.experiments.plans``, so a table always shows exactly the runs a notebook trained:

- :func:`kd_table`: teacher / KD student / baseline accuracy (the paper's Section 3);
- :func:`table1_frame`: the paper's Table 1 schedule and weight sweep, ours beside the paper's;
- :func:`table2_long` / :func:`table2_frame`: Table 2, every method on every network;
- :func:`significance_table`: Welch's t-test of CD-300 and CD-200 against every method of their own
  training budget (:func:`budget`; CD-300 against the 300-epoch controls, PS-KD and its variants,
  CD-200 against the 200-epoch methods);
- :func:`leak_table`: the released code's test-set source (README, "Deviations") against each
  leak-free CD-300 source (training batches, eval-mode training images, held-out validation),
  and :func:`test_source_messages`;
- Figure 3's baseline-vs-CD Interaction Tensor comes from :func:`cdlib.experiments.feature_analysis.analyse_profile`;
- :func:`cd_claim`: claim 5 with its rule, at equal budget (CD-300 vs PS-KD, CD-200 vs CS-KD);
- :func:`replay_cd_ema`: the EMA confusion matrix Q~ of a CD run after every epoch,
  rebuilt exactly from the run's stored per-epoch confusion counts.

Accuracy is reported as README's "Deviations" says: final-epoch top-1 is the headline,
best-epoch top-1 (what the paper reports) a separate, labelled column; spread is the
sample std (ddof = 1) and ``95% CI`` the half-width of the t-interval over seeds. Every
comparison with a p-value is between runs of one training budget, and says so ("12 vs 12
epochs"); no verdict reads a test-selected number (``tables.TEST_SELECTED``).
"""
from __future__ import annotations

import warnings
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from scipy import stats

from cdlib.experiments import paper, plans, tables
from cdlib.core import runs as run_store
from cdlib.experiments.claims import NOT_SUPPORTED, SUPPORTED, Claim
from cdlib.core.config import TrainConfig
from cdlib.core.losses import EpochEnd
from cdlib.core.objectives import cd_ema_updates, cd_phase, make_objective
from cdlib.experiments.profiles import Profile

# Display names of Table 2's methods (keys of plans.TABLE2_METHODS), in table order.
METHOD_LABELS = {
    "baseline": "Baseline (CE)",
    "ls": "Label smoothing",
    "baseline300": "Baseline (CE), 300-epoch budget",
    "ls300": "Label smoothing, 300-epoch budget",
    "tfkd_reg": "Tf-KD_reg",
    "cskd": "CS-KD",
    "pskd": "PS-KD",
    "cd200": "CD-200",
    "cd300": "CD-300",
    "cd300-test": "CD-300, test-set source (leaks test labels)",
    "cd300-holdout": "CD-300, held-out validation source",
    "cd300-train_eval": "CD-300, eval-mode training source",
    "cd300-diagonal": "CD-300 ablation: diagonal targets",
    "cd300-shuffled": "CD-300 ablation: shuffled off-diagonal",
    "cd300-static": "CD-300 ablation: static label smoothing",
}
LEAKY_METHODS = ("cd300-test",)
CD_REFERENCES = ("cd300", "cd200")   # the leak-free CD rows tested against every other method
# Claim 5's comparisons at equal budget: CD-300 and PS-KD train 300 paper epochs, CD-200 and CS-KD 200.
CLAIM5_PAIRS = (("cd300", "pskd"), ("cd200", "cskd"))
CLAIM5_LINKS = ("tables/05_table2.md", "tables/05_significance.md", "figures/05_fig3a_feature_frequency.png",
                "figures/05_fig3b_features_per_image.png")

ARCH_LABELS = {"resnet18": "ResNet-18", "resnet34": "ResNet-34", "resnet50": "ResNet-50",
               "resnet101": "ResNet-101", "resnet152": "ResNet-152", "densenet121": "DenseNet-121"}


def arch_label(arch: str) -> str:
    return ARCH_LABELS.get(arch, arch)


def budget(profile: Profile, a: str, b: str, arch: str | None = None) -> tuple[bool, str]:
    """Whether Table 2 methods ``a`` and ``b`` train equally long in ``profile``, and "12 vs 8 epochs"."""
    ea, eb = plans.method_epochs(profile, a, arch), plans.method_epochs(profile, b, arch)
    return ea == eb, f"{ea} vs {eb} epochs"


def paper_budget(a: str, b: str) -> str:
    """The paper's epochs of Table 2 methods ``a`` and ``b``: "300 vs 200 epochs"."""
    return f"{plans.TABLE2_METHODS[a][2]} vs {plans.TABLE2_METHODS[b][2]} epochs"


# ----------------------------------------------------------------------------- loading

def load_runs(configs: Sequence[TrainConfig], root=None) -> list[run_store.Run]:
    """The finished runs of ``configs`` from the run store (``root``: default ``outputs/runs``)."""
    return run_store.finished_runs(configs, root)


def summary_values(run_list: Sequence[run_store.Run], metric: str) -> np.ndarray:
    """``metric`` of each run's summary; NaN where a run predates it (NLL, ECE and the selected epoch
    were added to summaries later)."""
    return np.array([r.summary.get(metric, np.nan) for r in run_list], dtype=np.float64)


# Summary numbers every table row aggregates over seeds.
ROW_METRICS = tables.ACCURACY_COLUMNS + ("best_epoch", "selected_top1", "selected_epoch", "final_nll", "final_ece")


def _summary_row(run_list: Sequence[run_store.Run]) -> dict:
    """n and, per accuracy column and best_epoch, mean / std / ci95 over the runs."""
    row = {"n": len(run_list)}
    for metric in ROW_METRICS:
        mean, std, ci, _ = tables.mean_std_ci(summary_values(run_list, metric))
        row.update({f"{metric}_mean": mean, f"{metric}_std": std, f"{metric}_ci95": ci})
    return row


def _mean_std(row: Mapping, metric: str) -> str:
    return tables.format_mean_std(row[f"{metric}_mean"], row[f"{metric}_std"])


# ----------------------------------------------------------------------------- (a) KD

def kd_groups(profile: Profile) -> dict[str, list[TrainConfig]]:
    """The three groups of the paper's Section 3: teachers, KD students, cross-entropy baselines."""
    return {"teacher": plans.teachers(profile), "KD student": plans.kd_students(profile),
            "baseline": plans.feature_baselines(profile)}


def kd_table(profile: Profile, root=None, numeric: bool = False) -> pd.DataFrame:
    """Teacher / KD student / baseline accuracy: one row per group.

    Columns: model, arch, objective, epochs, n, final top-1 (mean ± std), 95% CI (half-width),
    best top-1 (mean ± std), best epoch (mean), final top-5; with ``numeric`` also the
    means behind the text columns (``final_top1_mean``, ``best_top1_mean``).
    """
    rows = []
    for group, configs in kd_groups(profile).items():
        s = _summary_row(load_runs(configs, root))
        first = configs[0]
        objective = {"ce": "cross-entropy"}.get(first.objective, first.objective) if first.objective != "kd" else (
            "KD T={T:g}, {w_kd:g} KL + {w_ce:g} CE".format(**first.objective_args))
        rows.append({
            "model": group, "arch": arch_label(first.arch), "objective": objective, "epochs": first.epochs,
            "n": s["n"], "final top-1": _mean_std(s, "final_top1"), "95% CI": s["final_top1_ci95"],
            "best top-1": _mean_std(s, "best_top1"), "best epoch": s["best_epoch_mean"],
            "final top-5": _mean_std(s, "final_top5"),
            **({"final_top1_mean": s["final_top1_mean"], "best_top1_mean": s["best_top1_mean"]} if numeric else {}),
        })
    return pd.DataFrame(rows)


def kd_metrics(profile: Profile, root=None) -> pd.DataFrame:
    """Per-epoch metrics of the three KD groups (``tables.metrics_frame``) with a ``group`` column
    such as "teacher (ResNet-34)", for ``figures.plot_learning_curves(..., by="group")``."""
    frames = []
    for group, configs in kd_groups(profile).items():
        frame = tables.metrics_frame(load_runs(configs, root))
        frame["group"] = f"{group} ({arch_label(configs[0].arch)})"
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


def kd_gain(profile: Profile, root=None) -> pd.DataFrame:
    """KD student minus baseline (same architecture), final and best top-1, with Welch's test."""
    groups = {g: load_runs(c, root) for g, c in kd_groups(profile).items()}
    rows = []
    for metric in ("final_top1", "best_top1"):
        a, b = summary_values(groups["KD student"], metric), summary_values(groups["baseline"], metric)
        t, p, note = welch(a, b)
        rows.append({"metric": metric, "KD student": a.mean(), "baseline": b.mean(),
                     "difference": a.mean() - b.mean(), "t": round(t, 3), "p (Welch)": format_p(p),
                     "n student": len(a), "n baseline": len(b), "note": note})
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------- (b) Table 1

def schedule_label(schedule: Sequence[int] | None) -> str:
    """``[1, 1, 2, 1, 4]`` -> ``1H 1S 2H 1S 4H`` (epochs of this profile, alternating from hard)."""
    if not schedule:
        return "CE only"
    return " ".join(f"{n}{'HS'[i % 2]}" for i, n in enumerate(schedule))


def table1_frame(profile: Profile, root=None, seed: int = 0) -> pd.DataFrame:
    """Table 1: the paper's schedule/weight sweep on the student network, one seed (as the paper).

    Columns: label (the paper's row, schedule in units of 10 paper epochs), weights
    soft:CE, our schedule in this profile's epochs, epochs, run, final top-1, best
    top-1, best epoch, and the paper's top-1 (best epoch of one run).
    """
    rows = []
    for label, config, paper_top1 in plans.table1(profile, seed):
        run = load_runs([config], root)[0]
        args = config.objective_args
        rows.append({
            "paper row": label,
            "soft:CE": f"{args['w_soft']:g}:{args['w_ce']:g}" if config.objective == "cd" else "-",
            "our schedule": schedule_label(args.get("schedule")),
            "epochs": config.epochs, "run": config.run_id(),
            "final top-1": run.summary["final_top1"], "best top-1": run.summary["best_top1"],
            "best epoch": run.summary["best_epoch"], "paper (best)": paper_top1,
        })
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------- (c) Table 2

def table2_runs(profile: Profile, root=None, methods: Sequence[str] | None = None,
                finished_only: bool = False) -> dict[tuple[str, str], list[run_store.Run]]:
    """(method, arch) -> the finished runs of that Table 2 cell, for ``methods`` (default all). A run
    not trained yet raises ``RunNotFoundError``, or with ``finished_only`` is left out (a cell without
    runs is left out too)."""
    cells: dict[tuple[str, str], list[run_store.Run]] = {}
    for method, configs in plans.table2(profile).items():
        if methods is not None and method not in methods:
            continue
        if finished_only:
            configs = [c for c in configs if run_store.is_finished(run_store.run_dir(c, root))]
        for config, run in zip(configs, load_runs(configs, root)):
            cells.setdefault((method, config.arch), []).append(run)
    return cells


def table2_long(profile: Profile, root=None, cells: Mapping | None = None) -> pd.DataFrame:
    """One row per (method, arch) of ``cells`` (default ``table2_runs``): n, mean / std / ci95 of every
    accuracy column, paper's number."""
    rows = []
    for (method, arch), run_list in (table2_runs(profile, root) if cells is None else cells).items():
        paper_value = paper.table2(method, arch)
        rows.append({"method": method, "label": METHOD_LABELS.get(method, method), "arch": arch,
                     "epochs": plans.method_epochs(profile, method, arch),
                     "epochs (paper)": plans.TABLE2_METHODS[method][2], **_summary_row(run_list),
                     "paper": np.nan if paper_value is None else paper_value})
    return pd.DataFrame(rows)


def table2_frame(profile: Profile, root=None) -> pd.DataFrame:
    """Table 2 for display: rows = methods; per network, the columns

    ``final`` (final-epoch top-1, mean ± std), ``95% CI`` (its half-width), ``val-selected``
    (test top-1 at the epoch of best validation top-1; only with a validation split), ``best
    (test-selected)`` (test top-1 at the epoch of best test top-1: selection on test data, what
    the paper reports), ``paper (best)`` (the paper's number, best epoch, next to ours), ``top-5``
    (final top-5), ``NLL`` (final mean test cross-entropy), ``ECE`` (final, %, 15 bins) and
    ``n`` (seeds).
    """
    long = table2_long(profile, root)
    out = long[["method", "label", "epochs", "epochs (paper)"]].drop_duplicates("method").set_index("method")
    for arch, group in long.groupby("arch", sort=False):
        group = group.set_index("method")
        name = arch_label(arch)

        def text(metric: str) -> pd.Series:
            return pd.Series([tables.format_mean_std(m, sd) for m, sd in
                              zip(group[f"{metric}_mean"], group[f"{metric}_std"])], index=group.index)

        out[f"{name} final"] = text("final_top1")
        out[f"{name} 95% CI"] = group["final_top1_ci95"]
        if profile.validation:
            out[f"{name} val-selected"] = text("selected_top1")
        out[f"{name} best (test-selected)"] = text("best_top1")
        out[f"{name} paper (best)"] = group["paper"]
        out[f"{name} top-5"] = text("final_top5")
        out[f"{name} NLL"] = text("final_nll")
        out[f"{name} ECE"] = text("final_ece")
        out[f"{name} n"] = group["n"]
    return out.reset_index()


def cd_run(profile: Profile, method: str = "cd300", seed: int = 0, arch: str | None = None,
           root=None) -> run_store.Run:
    """One finished Table 2 run: ``method`` on ``arch`` (default the student network), seed ``seed``."""
    return load_runs([plans.method_config(profile, method, arch or profile.student_arch, seed)], root)[0]


# ----------------------------------------------------------------------------- (d) significance

def format_p(p: float) -> str:
    """A p-value as text with 3 significant digits ("n/a" when undefined): 2-decimal table
    formatting would print 0.001 and 0.004 alike as 0.00."""
    return "n/a" if p is None or np.isnan(p) else f"{p:.3g}"


def welch(a, b) -> tuple[float, float, str]:
    """Welch's t-test of mean(a) vs mean(b): (t, two-sided p, note); NaN with the reason when undefined."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if len(a) < 2 or len(b) < 2:
        return np.nan, np.nan, f"needs >= 2 seeds per group (n = {len(a)} vs {len(b)}): no variance estimate"
    if a.std(ddof=1) == 0 and b.std(ddof=1) == 0:
        return np.nan, np.nan, "both groups have zero variance over seeds: t undefined"
    result = stats.ttest_ind(a, b, equal_var=False)
    return float(result.statistic), float(result.pvalue), ""


def significance_table(profile: Profile, root=None, metric: str = "final_top1",
                       references: Sequence[str] = CD_REFERENCES) -> pd.DataFrame:
    """Each leak-free CD row against every other method of its own budget, per network, by Welch's
    t-test over seeds: CD-300 against the 300-epoch methods, CD-200 against the 200-epoch ones. A
    method of another budget is not compared (in short schedules the budget decides it).

    Columns: network, CD (the reference), method, epochs ("12 vs 12 epochs"), their means,
    difference (CD - method), t, p (two-sided), n of each, and a note (why p is NaN; the leaky
    test-source row is flagged).
    No correction for multiple comparisons is applied: read p against 0.05 / (number of rows)
    for a Bonferroni-corrected reading.
    """
    cells = table2_runs(profile, root)
    archs = list(dict.fromkeys(arch for _, arch in cells))
    methods = list(dict.fromkeys(method for method, _ in cells))
    rows = []
    for arch in archs:
        for ref in references:
            a = summary_values(cells[(ref, arch)], metric)
            for method in methods:
                same, epochs = budget(profile, ref, method, arch)
                if method == ref or not same:
                    continue
                b = summary_values(cells[(method, arch)], metric)
                t, p, note = welch(a, b)
                if method in LEAKY_METHODS:
                    note = "; ".join(filter(None, ["test-source run: its test accuracy is not held out", note]))
                rows.append({"network": arch_label(arch), "CD": METHOD_LABELS[ref], "method": METHOD_LABELS[method],
                             "epochs": epochs, "CD mean": a.mean(), "method mean": b.mean(), "difference": a.mean() - b.mean(),
                             "t": round(t, 3), "p (Welch)": format_p(p), "n CD": len(a), "n method": len(b), "note": note})
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------- (e) the leak

# The leak-free CD-300 sources the test-set source is compared with, in table order.
LEAK_FREE_SOURCES = {"cd300": "training batches", "cd300-train_eval": "eval-mode training images",
                     "cd300-holdout": "held-out validation"}


def leak_table(profile: Profile, root=None, cells: Mapping | None = None) -> pd.DataFrame:
    """CD-300 with Q(t) from the test set (the released code) against each leak-free source.

    One row per network, leak-free source and metric: final top-1, and the top-1 at the
    selected epoch (chosen on validation where the profile holds a split out, otherwise the
    test-selected best epoch, which the test source then profits from twice). Columns: both
    means ± std, the difference test source minus leak-free source, Welch's t-test. Against the
    training batches the difference mixes two effects, the test labels and the training-batch
    bias (train-mode predictions on images being fitted); against the held-out source it is what
    the test labels add, and held-out minus training batches is what that bias costs. ``cells``:
    default ``table2_runs``.
    """
    cells = table2_runs(profile, root) if cells is None else cells
    selected = ("selected_top1", "val-selected top-1") if profile.validation else ("best_top1", "best top-1 (test-selected)")
    rows = []
    for arch in dict.fromkeys(arch for _, arch in cells):
        if ("cd300-test", arch) not in cells:
            continue
        test_runs = cells[("cd300-test", arch)]
        for method, source in LEAK_FREE_SOURCES.items():
            if (method, arch) not in cells:
                continue
            for metric, label in (("final_top1", "final top-1"), selected):
                a, b = summary_values(cells[(method, arch)], metric), summary_values(test_runs, metric)
                t, p, note = welch(b, a)
                rows.append({"network": arch_label(arch), "leak-free source": source, "metric": label,
                             "epochs": budget(profile, method, "cd300-test", arch)[1],
                             "leak-free": tables.format_mean_std(*tables.mean_std_ci(a)[:2]),
                             "test source (leak)": tables.format_mean_std(*tables.mean_std_ci(b)[:2]),
                             "difference (test - leak-free)": b.mean() - a.mean(), "t": round(t, 3),
                             "p (Welch)": format_p(p), "n": f"{len(a)} / {len(b)}", "note": note})
    return pd.DataFrame(rows)


def _setup(objective, config: TrainConfig, num_classes: int) -> None:
    """Set up an objective outside training: it needs the config and the labels' device only."""
    objective.setup(config, torch.zeros(num_classes, dtype=torch.long), num_classes)


def test_source_messages(num_classes: int = 100) -> dict[str, str]:
    """The two guards of the test-set source, as the user meets them.

    ``refusal``: the error raised when ``source="test"`` is asked for without
    ``allow_test_leak=True``; ``warning``: the warning emitted when such a run starts.
    """
    args = dict(plans.TABLE2_METHODS["cd300-test"][1])
    try:
        make_objective("cd", {k: v for k, v in args.items() if k != "allow_test_leak"})
        refusal = "(no error raised)"
    except ValueError as err:
        refusal = str(err)
    objective = make_objective("cd", args)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _setup(objective, TrainConfig(epochs=sum(args["schedule"])), num_classes)
    return {"refusal": refusal, "warning": "\n".join(str(w.message) for w in caught) or "(no warning)"}


# ----------------------------------------------------------------------------- (g) the EMA

def replay_cd_ema(run: run_store.Run, what: str = "ema") -> np.ndarray:
    """(E, C, C) float64: Confusion Distillation's Q~ after each of the run's E epochs.

    Rebuilt by feeding the run's stored per-epoch confusion counts (``Run.confusions``)
    to a fresh ``ConfusionDistillation`` built from the run's config, through the same
    ``end_epoch`` the training loop calls: the counts are integers and the update runs
    in float64, so the result equals the objective's state during training: bit for bit
    for a run trained on the CPU (the tests check this), to float64 rounding (~1e-16) for
    one trained on a GPU, whose kernels may fuse the multiply-add. The objective picks the train or test counts according to its
    ``source``. ``what="targets"`` returns the target matrix R instead (differs from
    Q~ for the diagonal / shuffled / static ablations).
    """
    if what not in ("ema", "targets"):
        raise ValueError(f"what must be 'ema' or 'targets', got {what!r}")
    config = run.config
    if config.objective != "cd":
        raise ValueError(f"run {config.run_id()} trained objective {config.objective!r}, not 'cd'")
    objective = make_objective("cd", config.objective_args)
    C = int(run.summary["num_classes"])
    with warnings.catch_warnings():  # the test-source warning was shown when the run trained
        warnings.simplefilter("ignore")
        _setup(objective, config, C)
    train, test = run.confusions("train"), run.confusions("test")
    source = source_confusions(run)
    out = np.empty((config.epochs, C, C), dtype=np.float64)
    for epoch in range(config.epochs):
        fed = torch.from_numpy(source[epoch]).long()  # the split the source reads, whichever it is
        objective.end_epoch(EpochEnd(epoch, torch.from_numpy(train[epoch]).long(), torch.from_numpy(test[epoch]).long(),
                                     validation_confusion=fed, train_eval_confusion=fed))
        matrix = objective.ema if what == "ema" else objective.target_matrix()
        out[epoch] = matrix.numpy()
    return out


def offdiagonal_mass(matrices) -> np.ndarray:
    """Mean over classes of the off-diagonal share of each row, 1 - m[k, k] / sum_j m[k, j]:
    (E, C, C) -> (E,), (C, C) -> a 0-d array. For row-stochastic Q~ it is 1 - mean diagonal."""
    m = np.asarray(matrices, dtype=np.float64)
    rows = m.sum(-1)
    share = 1 - np.diagonal(m, axis1=-2, axis2=-1) / np.where(rows > 0, rows, 1)
    return share.mean(-1)


# The stored confusions (``Run.confusions``) each CD source reads.
SOURCE_SPLITS = {"train": "train", "holdout": "validation", "train_eval": "train_eval", "test": "test"}


def source_confusions(run: run_store.Run) -> np.ndarray:
    """(E, C, C) counts the CD run's EMA was fed from, per its ``source`` (``SOURCE_SPLITS``)."""
    return run.confusions(SOURCE_SPLITS[run.config.objective_args.get("source", "train")])


def cd_ema_frame(run: run_store.Run, ema: np.ndarray | None = None) -> pd.DataFrame:
    """Per epoch (1-based): phase, whether Q~ was updated, off-diagonal mass of Q~ and of that
    epoch's source confusion Q(t), and test top-1."""
    ema = replay_cd_ema(run) if ema is None else ema
    schedule = run.config.objective_args["schedule"]
    static = run.config.objective_args.get("targets") == "static"
    counts = source_confusions(run).astype(np.float64) + 1e-8
    metrics = run.metrics.set_index("epoch")
    epochs = np.arange(1, len(ema) + 1)
    return pd.DataFrame({
        "epoch": epochs,
        "phase": [cd_phase(schedule, e - 1) for e in epochs],
        "ema updated": [not static and cd_ema_updates(schedule, e - 1) for e in epochs],
        "off-diagonal mass of Q~": offdiagonal_mass(ema),
        "off-diagonal mass of Q(t)": offdiagonal_mass(counts / counts.sum(-1, keepdims=True)),
        "test top-1": metrics.loc[epochs, "test_top1"].to_numpy(),
    })


# ----------------------------------------------------------------------------- Figure 3

# Figure 3 (baseline vs CD Interaction Tensor) is cdlib.experiments.feature_analysis.analyse_profile(P, ("baseline", "cd")).


# ----------------------------------------------------------------------------- (f) claim 5

def paper_claim5_text() -> str:
    """What the paper's own Table 2 says about claim 5's accuracy half, network by network, at equal budget
    (CD-300 vs PS-KD, CD-200 vs CS-KD), and its headline comparison, which mixes budgets."""
    parts = []
    for arch in paper.TABLE2_ARCHS:
        pairs = [f"{METHOD_LABELS[cd]} {paper.table2(cd, arch):.2f} vs {METHOD_LABELS[other]} "
                 f"{paper.table2(other, arch):.2f} ({'above' if paper.table2(cd, arch) > paper.table2(other, arch) else 'not above'})"
                 for cd, other in CLAIM5_PAIRS]
        parts.append(f"{arch_label(arch)} " + ", ".join(pairs))
    return ("Best epoch, test-set CD source, mean of 3, equal budgets (" + "; ".join(paper_budget(*p) for p in CLAIM5_PAIRS)
            + "): " + "; ".join(parts) + f". Its headline sets CD-300 against CS-KD too ({paper_budget('cd300', 'cskd')}"
            f", not counted here); ResNet-34 margin over the better of the two +{paper.resnet34_margin():.1f}. "
            "Fewer, more frequently used features than the baseline (Section 4.3, its numbers inconsistent)")


def cd_claim(profile: Profile, root=None, features=None,
             alpha: float = 0.05) -> Claim:
    """Claim 5: CD beats CS-KD and PS-KD (+1.2 on ResNet-34) and has KD-like feature effects.

    Rule. Accuracy half, on every network of the profile and at equal training budget: the
    leak-free CD-300's mean final-epoch top-1 over seeds exceeds PS-KD's (both 300 paper epochs)
    and CD-200's exceeds CS-KD's (both 200), each difference significant by Welch's t-test
    (two-sided p < ``alpha``; with fewer than 2 seeds per cell there is no test and the half
    fails). The paper's CD-300 against CS-KD (300 vs 200 epochs) is not counted. Feature half
    (when ``features``, a ``feature_analysis.FeatureAnalysis`` with groups "baseline" and "cd",
    is given): in the baseline-vs-CD Interaction Tensor the CD models use fewer features than
    the baselines (|F| lower) and reuse each on more images (mean frequency E[F] higher), the
    pruning KD does (claim 2). Supported iff every measured half holds. Under this rule the
    paper's own Table 2 numbers would not hold on ResNet-18 and DenseNet-121 (PS-KD is higher
    there); ``paper`` says so.
    """
    cells = table2_runs(profile, root)
    top1 = {key: summary_values(run_list, "final_top1") for key, run_list in cells.items()}
    seeds = {len(v) for v in cells.values()}
    archs = list(dict.fromkeys(arch for _, arch in cells))
    for arch in archs:
        for cd, other in CLAIM5_PAIRS:
            same, epochs = budget(profile, cd, other, arch)
            if not same:  # the plans give both the same paper budget; a profile cannot break that silently
                raise ValueError(f"claim 5 compares {cd} with {other} at equal budget, but they train {epochs}")
    source = (f"{profile.dataset}, profile {profile.label}, {', '.join(arch_label(a) for a in archs)}, "
              f"{'/'.join(str(s) for s in sorted(seeds))} seeds per cell, final-epoch top-1, "
              + ", ".join(f"{METHOD_LABELS[cd]} vs {METHOD_LABELS[o]} {budget(profile, cd, o)[1]}" for cd, o in CLAIM5_PAIRS))
    return claim5(top1, features, source, alpha, what="leak-free CD mean final-epoch top-1 over seeds")


def claim5(top1: Mapping[tuple[str, str], np.ndarray], features, source: str, alpha: float = 0.05,
           what: str = "CD mean top-1", links: Sequence[str] = CLAIM5_LINKS) -> Claim:
    """Claim 5 by ``cd_claim``'s rule from top-1 values per (method, arch) (the methods of ``CLAIM5_PAIRS``)
    and, when given, a ``FeatureAnalysis`` with groups "baseline" and "cd"."""
    archs = list(dict.fromkeys(arch for _, arch in top1))
    parts, holds = [], []
    for arch in archs:
        for cd_method, other in CLAIM5_PAIRS:
            cd, rival = top1[(cd_method, arch)], top1[(other, arch)]
            _, p, note = welch(cd, rival)
            holds.append(cd.mean() > rival.mean() and bool(p < alpha))  # NaN p (no test possible) fails
            parts.append(f"{arch_label(arch)}: {METHOD_LABELS[cd_method]} {cd.mean():.2f} vs {METHOD_LABELS[other]} "
                         f"{rival.mean():.2f} ({paper_budget(cd_method, other)} in the paper's units), difference "
                         f"{cd.mean() - rival.mean():+.2f}, Welch p {format_p(p)}{f' ({note})' if note else ''}, "
                         f"n = {len(cd)} / {len(rival)}")
    if "resnet34" not in archs:
        parts.append("ResNet-34 is not in this profile, so its margin is not measured")
    verdict_ok = all(holds)
    rule = (f"accuracy, at equal budget: on every network, {what}: CD-300 > PS-KD (both 300 paper epochs) and "
            f"CD-200 > CS-KD (both 200), each difference significant (Welch's t-test, two-sided p < {alpha:g}; "
            "fewer than 2 seeds fails); CD-300 against CS-KD (300 vs 200 epochs) is not counted")
    if features is not None:
        base, cd = features.groups["baseline"], features.groups["cd"]
        feature_ok = cd.n_features < base.n_features and cd.mean_frequency > base.mean_frequency
        verdict_ok = verdict_ok and feature_ok
        rule += ("; features: CD uses fewer features (|F|) than the baselines and each on more images "
                 "(E[F] higher) in the baseline-vs-CD Interaction Tensor; supported iff both halves hold")
        parts.append(f"features: |F| baseline {base.n_features} vs CD {cd.n_features}, E[F] baseline "
                     f"{base.mean_frequency:.0f} vs CD {cd.mean_frequency:.0f}, features per image "
                     f"{base.mean_features_per_image:.1f} vs {cd.mean_features_per_image:.1f} "
                     f"({len(base.models)} + {len(cd.models)} models)")
    else:
        rule += "; the feature half was not measured here, so the verdict covers accuracy only"
    return Claim(5, paper=paper_claim5_text(), ours="; ".join(parts),
                 verdict=SUPPORTED if verdict_ok else NOT_SUPPORTED, rule=rule, source=source, links=list(links))


__all__ = [
    "METHOD_LABELS", "CD_REFERENCES", "CLAIM5_PAIRS", "budget", "paper_budget", "LEAKY_METHODS", "load_runs", "kd_groups", "kd_table", "kd_metrics", "kd_gain",
    "schedule_label", "table1_frame", "table2_runs", "table2_long", "table2_frame", "cd_run", "format_p", "welch",
    "significance_table", "leak_table", "summary_values", "LEAK_FREE_SOURCES", "SOURCE_SPLITS", "test_source_messages",
    "replay_cd_ema", "offdiagonal_mass", "source_confusions", "cd_ema_frame", "paper_claim5_text", "cd_claim", "claim5", "arch_label",
]
