"""Claim 4 from the run store: a baseline's confusion matrix as the teacher's dark knowledge.

The paper (Section 4.1) compares two class-by-class matrices on the test set: the
teacher's class-wise mean softmax ``M`` (T = 1) and a baseline's row-normalised hard
confusion matrix ``Q``, off the diagonal only (Pearson, per-class cosine and soft
Jaccard; ``paper.CONFUSION_SIMILARITY``). :func:`analyse` does that for a profile,
with the controls and the spread the paper does not give:

- every baseline ``i`` is paired with teacher ``i`` (the pairing of the KD students),
  and each measure is reported as mean and sample std over the pairs;
- a null distribution: ``M`` against copies of ``Q`` whose off-diagonal entries are
  shuffled within each row (same per-class error rates, no shared structure), and the
  distance of the observed value from it in null standard deviations (z);
- a ceiling: teacher ``i``'s ``M`` against the ``M`` and ``Q`` of teacher ``i + 1``,
  i.e. how alike two equally trained networks of the teacher's kind are;
- evolution over training: the measures against each epoch's test confusion of the
  baselines and, when the run store holds them finished, of the CD models of
  Figure 3 (``plans.cd_feature_models``). Nothing is trained here.

Numbers come from stored files only (``test_logits.npy``, ``confusions.npz``), so the
analysis takes seconds and needs no device. :func:`confusion_claim` turns the result
into the verdict on claim 4 by a stated rule.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from cdlib.experiments import claims, paper, plans
from cdlib.core import confusion, runs
from cdlib import paths
from cdlib.core.config import TrainConfig
from cdlib.experiments.profiles import Profile
from cdlib.errors import UserError

# What the notebook writes (names under outputs/figures and outputs/tables).
FIGURES = {
    "heatmaps": "04_confusion_heatmaps",
    "null": "04_shuffled_control",
    "spectra": "04_confusion_spectra",
    "epochs": "04_similarity_over_epochs",
}
TABLES = {"similarity": "04_similarity", "pairs": "04_similarity_pairs", "claim": "04_claim4"}

CLAIM_MEASURES = ("pearson", "cosine", "soft_jaccard")  # the three the paper reports
Z_THRESHOLD = 3.0

# Comparisons, one row each per pair in ``DarkKnowledgeResult.pairs``.
BASELINE = "teacher M vs baseline Q"
CEILING_M = "teacher M vs teacher' M"
CEILING_Q = "teacher M vs teacher' Q"
COMPARISONS = (BASELINE, CEILING_M, CEILING_Q)


class MissingRunsError(UserError, RuntimeError):
    """The run store lacks finished runs the analysis needs (it never trains them)."""


# ---------------------------------------------------------------------------
# The two matrices of one run


def teacher_matrix(run: runs.Run, labels) -> np.ndarray:
    """M of a finished run: class-wise mean softmax (T = 1) of its stored test logits."""
    logits = run.test_logits()
    labels = np.asarray(labels)
    if logits.shape[0] != labels.shape[0]:
        raise ValueError(f"{run.config.run_id()}: {logits.shape[0]} stored test logits but {labels.shape[0]} "
                         f"test labels; was it trained on another data set?")
    return confusion.class_mean_softmax(logits, labels, logits.shape[1], from_logits=True)


def final_confusion(run: runs.Run, eps: float = 1e-8) -> np.ndarray:
    """Q of a finished run: its last epoch's test confusion counts, row-normalised (eps as the authors)."""
    return confusion.row_normalise(run.confusions("test")[-1], eps)


def check_labels(run: runs.Run, labels) -> None:
    """The stored confusion counts must have the class sizes of ``labels`` (catches a wrong data set)."""
    counts = run.confusions("test")[-1]
    sizes = np.bincount(np.asarray(labels), minlength=counts.shape[0])
    if sizes.shape[0] != counts.shape[0] or not np.array_equal(counts.sum(axis=1), sizes):
        raise ValueError(f"{run.config.run_id()}: class sizes of its test confusion differ from the test "
                         f"labels given; was it trained on another data set?")


# ---------------------------------------------------------------------------
# Statistics


def z_score(observed: float, mean: float, std: float) -> float:
    """(observed - mean) / std; +-inf when the null has no spread and observed differs, 0 when equal."""
    if np.isnan(observed) or np.isnan(mean) or np.isnan(std):
        return float("nan")
    if std > 0:
        return float((observed - mean) / std)
    return 0.0 if observed == mean else float(np.copysign(np.inf, observed - mean))


def compare(m, q, num_shuffles: int = 100, seed=0) -> dict[str, float]:
    """Every measure of ``m`` against ``q``, with the shuffled-``q`` control: for each measure
    ``<measure>``, ``<measure> shuffled mean``, ``<measure> shuffled std`` and ``<measure> z``.
    ``num_shuffles = 0`` skips the control (NaN columns)."""
    row = confusion.similarity(m, q)
    if num_shuffles:
        null = confusion.shuffled_values(m, q, num_shuffles, seed)
        means, stds = null.mean(), null.std(ddof=1)
    for measure in confusion.MEASURES:
        mean = float(means[measure]) if num_shuffles else float("nan")
        std = float(stds[measure]) if num_shuffles else float("nan")
        row[f"{measure} shuffled mean"], row[f"{measure} shuffled std"] = mean, std
        row[f"{measure} z"] = z_score(row[measure], mean, std)
    return row


def spread(values) -> tuple[float, float, int]:
    """Mean, sample std (ddof = 1; NaN for one value) and count of the non-NaN ``values``."""
    x = np.asarray(values, dtype=np.float64)
    x = x[~np.isnan(x)]
    n = len(x)
    if n == 0:
        return float("nan"), float("nan"), 0
    return float(x.mean()), float(x.std(ddof=1)) if n > 1 else float("nan"), n


def _fmt(mean: float, std: float, digits: int = 2) -> str:
    if np.isnan(mean):
        return "n/a"
    return f"{mean:.{digits}f}" if np.isnan(std) else f"{mean:.{digits}f} ± {std:.{digits}f}"


# ---------------------------------------------------------------------------
# The result


@dataclass
class DarkKnowledgeResult:
    """Everything notebook 04 shows; see :func:`analyse`."""
    profile: str
    dataset: str
    baseline_arch: str
    teacher_arch: str
    classes: list[str]
    superclass_of: np.ndarray | None
    superclasses: list[str] | None
    matrices: dict[str, np.ndarray]   # pair 0: "teacher M", "baseline Q", "shuffled baseline Q", "teacher' M", ...
    pairs: pd.DataFrame               # one row per (comparison, pair): runs, measures, controls, z
    null: pd.DataFrame                # pair 0's shuffled-Q null distribution, a column per measure
    epochs: pd.DataFrame              # long: group, pair, run_id, epoch, measures, accuracy
    num_shuffles: int
    notes: list[str] = field(default_factory=list)

    @property
    def num_pairs(self) -> int:
        return int((self.pairs["comparison"] == BASELINE).sum())

    def comparison(self, name: str = BASELINE) -> pd.DataFrame:
        return self.pairs[self.pairs["comparison"] == name]

    def summary(self) -> pd.DataFrame:
        """Rows: measures. Numeric columns: the paper's value, mean/std/n over pairs of each
        comparison, the shuffled control (mean over pairs of the null mean and null std), the
        smallest and mean z over pairs, and ours minus the paper."""
        base = self.comparison(BASELINE)
        rows = []
        for measure in confusion.MEASURES:
            row = {"measure": measure, "paper": paper.CONFUSION_SIMILARITY.get(measure, np.nan)}
            for name in COMPARISONS:
                mean, std, n = spread(self.comparison(name)[measure])
                row.update({f"{name} mean": mean, f"{name} std": std, f"{name} n": n})
            row["shuffled mean"] = float(base[f"{measure} shuffled mean"].mean())
            row["shuffled std"] = float(base[f"{measure} shuffled std"].mean())
            row["z min"] = float(base[f"{measure} z"].min())
            row["z mean"] = float(base[f"{measure} z"].mean())
            row["ours - paper"] = row[f"{BASELINE} mean"] - row["paper"]
            rows.append(row)
        return pd.DataFrame(rows)

    def summary_text(self, digits: int = 2) -> pd.DataFrame:
        """``summary`` as text, "mean ± std" cells, for the notebook and ``tables.write_table``."""
        s = self.summary()
        n = self.num_pairs
        out = pd.DataFrame({"measure": s["measure"]})
        out["paper"] = ["n/a" if np.isnan(v) else f"{v:.2f}" for v in s["paper"]]
        out[f"ours: {BASELINE} (n={n})"] = [_fmt(m, sd, digits) for m, sd in
                                            zip(s[f"{BASELINE} mean"], s[f"{BASELINE} std"])]
        out["ours - paper"] = ["n/a" if np.isnan(v) else f"{v:+.{digits}f}" for v in s["ours - paper"]]
        out[f"shuffled Q ({self.num_shuffles} shuffles)"] = [
            _fmt(m, sd, digits) for m, sd in zip(s["shuffled mean"], s["shuffled std"])]
        out["z (min over pairs)"] = [f"{v:.1f}" for v in s["z min"]]
        for name in (CEILING_M, CEILING_Q):
            k = int(s[f"{name} n"].iloc[0])
            out[f"ceiling: {name} (n={k})"] = [_fmt(m, sd, digits) for m, sd in
                                              zip(s[f"{name} mean"], s[f"{name} std"])]
        return out

    def pairs_text(self, digits: int = 3) -> pd.DataFrame:
        """One row per pair and comparison: the runs and the value of every measure."""
        cols = ["comparison", "pair", "M run", "other run", *confusion.MEASURES]
        out = self.pairs[cols].copy()
        for measure in confusion.MEASURES:
            out[measure] = out[measure].round(digits)
        return out

    def epoch_curves(self, group: str) -> dict[str, pd.DataFrame]:
        """Per-run tables (index epoch) of one group of ``epochs``, for plotting."""
        frame = self.epochs[self.epochs["group"] == group]
        return {rid: g.set_index("epoch") for rid, g in frame.groupby("run_id", sort=False)}


# ---------------------------------------------------------------------------
# The analysis


def required_runs(profile: Profile) -> list[TrainConfig]:
    """The runs the analysis needs finished: the profile's feature baselines and teachers."""
    return plans.feature_baselines(profile) + plans.teachers(profile)


def analyse(profile: Profile, data_root=None, data=None, root: Path | None = None,
            num_shuffles: int = 100, seed: int = 0, over_epochs: bool = True,
            max_epoch_points: int | None = 100) -> DarkKnowledgeResult:
    """Section 5 for ``profile`` from finished runs of the run store (``root``: default
    ``paths.runs()``); raises :class:`MissingRunsError` when baselines or teachers are missing.

    ``data`` is the loaded :class:`cdlib.core.data.Dataset` (only its test labels and class names
    are used); by default it is loaded from ``data_root``. ``over_epochs = False`` skips the
    curves; ``max_epoch_points`` evaluates at most that many evenly spaced epochs per run
    (the last one always included).
    """
    baselines, missing_b = runs.split_finished(plans.feature_baselines(profile), root)
    teachers, missing_t = runs.split_finished(plans.teachers(profile), root)
    if missing_b or missing_t:
        raise MissingRunsError(
            f"profile {profile.name} on {profile.dataset}: runs not trained: {missing_b + missing_t} "
            f"(notebook 01 or 04 trains them).")
    n = min(len(baselines), len(teachers))
    if n == 0:
        raise MissingRunsError(f"profile {profile.name} plans no baselines or teachers")
    if data is None:
        from cdlib.core.data import load_dataset
        data = load_dataset(profile.dataset, data_root)
    labels = np.asarray(data.test_labels)
    for run in baselines[:n] + teachers:
        check_labels(run, labels)

    ms = [teacher_matrix(t, labels) for t in teachers]
    teacher_qs = [final_confusion(t) for t in teachers]
    qs = [final_confusion(b) for b in baselines[:n]]

    rows, notes = [], []
    for i in range(n):
        row = compare(ms[i], qs[i], num_shuffles, seed + i)
        rows.append({"comparison": BASELINE, "pair": i, "M run": teachers[i].config.run_id(),
                     "other run": baselines[i].config.run_id(), **row})
    # Ceiling: teacher i against teacher i + 1 (no shuffled control: it is not what the claim tests).
    for i in range(len(teachers) - 1):
        for name, other in ((CEILING_M, ms[i + 1]), (CEILING_Q, teacher_qs[i + 1])):
            rows.append({"comparison": name, "pair": i, "M run": teachers[i].config.run_id(),
                         "other run": teachers[i + 1].config.run_id(), **compare(ms[i], other, 0)})
    if len(teachers) < 2:
        notes.append("one teacher only: no teacher-vs-teacher ceiling.")

    matrices = {"teacher M": ms[0], "baseline Q": qs[0],
                "shuffled baseline Q": confusion.shuffle_offdiagonal(qs[0], seed)}
    if len(teachers) > 1:
        matrices["teacher' M"], matrices["teacher' Q"] = ms[1], teacher_qs[1]

    epochs = pd.DataFrame()
    if over_epochs:
        cd_runs, missing_cd = runs.split_finished(plans.cd_feature_models(profile), root)
        if missing_cd:
            notes.append(f"CD models not in the run store (not trained here): {len(missing_cd)} of "
                         f"{len(missing_cd) + len(cd_runs)}; their curves are left out.")
        for run in cd_runs:
            check_labels(run, labels)
        curves = []
        for group, members in (("baseline", baselines[:n]), ("cd", cd_runs)):
            for i, run in enumerate(members):
                curves.append(_epoch_curve(run, ms[i % len(ms)], group, i, max_epoch_points))
        epochs = pd.concat(curves, ignore_index=True)

    return DarkKnowledgeResult(
        profile=profile.name, dataset=profile.dataset, baseline_arch=profile.student_arch,
        teacher_arch=profile.teacher_arch, classes=list(data.classes),
        superclass_of=None if data.superclass_of is None else np.asarray(data.superclass_of),
        superclasses=None if data.superclasses is None else list(data.superclasses),
        matrices=matrices, pairs=pd.DataFrame(rows),
        null=confusion.shuffled_values(ms[0], qs[0], num_shuffles, seed) if num_shuffles >= 2 else pd.DataFrame(),
        epochs=epochs, num_shuffles=num_shuffles, notes=notes)


def epoch_indices(num_epochs: int, max_points: int | None) -> np.ndarray:
    """At most ``max_points`` evenly spaced 0-based epoch indices, always ending at the last epoch."""
    if not max_points or num_epochs <= max_points:
        return np.arange(num_epochs)
    return np.unique(np.round(np.linspace(num_epochs - 1, 0, max_points)).astype(int))


def _epoch_curve(run: runs.Run, m: np.ndarray, group: str, pair: int, max_points: int | None) -> pd.DataFrame:
    counts = run.confusions("test")
    keep = epoch_indices(len(counts), max_points)
    table = confusion.similarity_over_epochs(m, counts[keep], epochs=keep + 1).reset_index()
    table.insert(0, "run_id", run.config.run_id())
    table.insert(0, "pair", pair)
    table.insert(0, "group", group)
    return table


# ---------------------------------------------------------------------------
# Claim 4


def claim_rule(num_shuffles: int) -> str:
    return (f"Supported when each of Pearson, cosine and soft Jaccard (teacher M vs baseline Q, off-diagonal) "
            f"exceeds the mean of its shuffled-Q control ({num_shuffles} copies of Q with off-diagonal entries "
            f"permuted within each row) by more than {Z_THRESHOLD:g} control standard deviations in every "
            f"baseline/teacher pair (smallest z > {Z_THRESHOLD:g}). The distance to the paper's values "
            f"({paper.confusion_similarity_text()}) is reported, not tested: it depends on the data set, the "
            f"networks and their accuracy.")


def _links(names: Sequence[str], folder: str, ext: str) -> list[str]:
    out = paths.outputs()
    return [f"{folder}/{n}.{ext}" for n in names if (out / folder / f"{n}.{ext}").is_file()]


def confusion_claim(result: DarkKnowledgeResult) -> claims.Claim:
    """Claim 4 with its verdict by :func:`claim_rule`; links list the notebook's outputs that exist."""
    s = result.summary().set_index("measure").loc[list(CLAIM_MEASURES)]
    n = result.num_pairs
    if result.num_shuffles < 2:
        return claims.not_measured(4, "no shuffled control computed (num_shuffles < 2)")
    supported = bool((s["z min"] > Z_THRESHOLD).all())
    names = {"pearson": "Pearson", "cosine": "cosine", "soft_jaccard": "soft Jaccard"}
    parts = []
    for m in CLAIM_MEASURES:
        r = s.loc[m]
        parts.append(f"{names[m]} {_fmt(r[f'{BASELINE} mean'], r[f'{BASELINE} std'])} "
                     f"(paper {r['paper']:.2f}, {r['ours - paper']:+.2f}; shuffled Q "
                     f"{_fmt(r['shuffled mean'], r['shuffled std'])}, min z {r['z min']:.1f}; "
                     f"teacher-teacher ceiling {_fmt(r[f'{CEILING_M} mean'], r[f'{CEILING_M} std'])})")
    ours = "; ".join(parts) + f". Mean ± std over {n} baseline/teacher pair{'s' if n != 1 else ''}."
    source = (f"{result.dataset} test set, profile {result.profile}: {n} {result.baseline_arch} baseline(s) "
              f"paired with {n} {result.teacher_arch} teacher(s)")
    links = _links(FIGURES.values(), "figures", "png") + _links(TABLES.values(), "tables", "md")
    return claims.Claim(
        4, paper=f"{paper.confusion_similarity_text()} (CIFAR-100 test set, ResNet-152 "
                 "teacher M vs ResNet-18 baseline Q; no spread or control reported)",
        ours=ours, verdict=claims.SUPPORTED if supported else claims.NOT_SUPPORTED,
        rule=claim_rule(result.num_shuffles), source=source, links=links)


def claim_frame(result: DarkKnowledgeResult) -> pd.DataFrame:
    """Claim 4 as a per-measure table: paper, ours, control, z and the test of the rule."""
    s = result.summary().set_index("measure").loc[list(CLAIM_MEASURES)]
    return pd.DataFrame({
        "measure": list(CLAIM_MEASURES),
        "paper": s["paper"].to_numpy(),
        "ours (mean)": s[f"{BASELINE} mean"].to_numpy(),
        "ours (std)": s[f"{BASELINE} std"].to_numpy(),
        "ours - paper": s["ours - paper"].to_numpy(),
        "shuffled mean": s["shuffled mean"].to_numpy(),
        "shuffled std": s["shuffled std"].to_numpy(),
        "z min": s["z min"].to_numpy(),
        f"z min > {Z_THRESHOLD:g}": (s["z min"] > Z_THRESHOLD).to_numpy(),
    })


# ---------------------------------------------------------------------------
# Figures of notebook 04 (thin wrappers of cdlib.experiments.confusion_figures)


def plot_heatmaps(result: DarkKnowledgeResult, name: str | None = FIGURES["heatmaps"]):
    """Teacher M, baseline Q and (when there is one) the second teacher's M of pair 0, classes
    ordered by super-class (by label when the data set has none)."""
    from cdlib.experiments import confusion_figures as cfig
    keys = [k for k in ("teacher M", "baseline Q", "teacher' M") if k in result.matrices]
    return cfig.plot_confusion_heatmaps({k: result.matrices[k] for k in keys}, result.superclass_of,
                                        result.superclasses, name=name)


def plot_null(result: DarkKnowledgeResult, name: str | None = FIGURES["null"]):
    """Pair 0: the shuffled-Q null distribution of each measure, the observed value, the ceiling."""
    from cdlib.experiments import confusion_figures as cfig
    ceiling = result.comparison(CEILING_M)
    return cfig.plot_shuffled_control(result.null, result.comparison(BASELINE).iloc[0],
                                      ceiling.iloc[0] if len(ceiling) else None, name=name)


def plot_spectra(result: DarkKnowledgeResult, name: str | None = FIGURES["spectra"]):
    """Normalised off-diagonal spectra of pair 0's matrices (teachers green, baseline blue)."""
    from cdlib.experiments import confusion_figures as cfig
    from cdlib.experiments.figures import GROUP_COLORS as colors
    styles = {"teacher M": dict(color=colors["teacher"]), "teacher' M": dict(color=colors["teacher"], ls="--"),
              "baseline Q": dict(color=colors["baseline"]),
              "shuffled baseline Q": dict(color=colors["baseline"], ls=":")}
    shown = {k: result.matrices[k] for k in styles if k in result.matrices}
    return cfig.plot_spectra(shown, styles=styles, name=name)


def plot_epochs(result: DarkKnowledgeResult, name: str | None = FIGURES["epochs"]):
    """The paper's three measures over training epochs per model group, against the shuffled control."""
    from cdlib.experiments import confusion_figures as cfig
    s = result.summary().set_index("measure")
    control = {m: (s.loc[m, "shuffled mean"], s.loc[m, "shuffled std"]) for m in confusion.MEASURES}
    return cfig.plot_similarity_curves(result.epochs, control=control, name=name)
