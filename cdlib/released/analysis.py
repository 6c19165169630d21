"""The paper's claims from the authors' released artifacts, through cdlib's analyses:
``python -m cdlib released --folder PATH [--data-root DIR] [--device cpu]``.

From a local copy of the released folder (``cdlib.released.artifacts``) it writes, under
``outputs/released/``:

- Table 2 re-evaluated: top-1, top-5, NLL and ECE of every released checkpoint on the CIFAR-100
  test set under two input normalisations (below), mean ± population std over the runs as the paper
  prints it, the paper's number beside;
- Section 4.1 from the released teacher and baseline: the three similarities of M (the teacher's
  class-mean softmax) and Q (the baseline's confusion), the shuffled control, the spectra;
- Figures 1 and 3's statistics (|F|, E[F], shared features, features per image) from the released
  Omega tensors, by ``cdlib.core.feature_statistics.group_statistics``;
- Figures 1a, 1b, 3a and 3b from those tensors;
- claims 1, 2 and 5 (its feature half from the CD tensor), by the pipeline's own verdict rules;
- ``REPORT_SECTION.md``, which ``python -m cdlib report`` puts into REPORT.md.

Everything is inference and tensor statistics, so it runs on a CPU. The released CD models were
trained with test-set confusion targets (the released code's leak); no evaluation can undo that,
and the report says so. Each checkpoint is evaluated with the input normalisation its own code
trained with and with the one the authors' Table 2 script (``analysis/evaluate_models.py``) applies to
every method, pytorch-cifar100's; the two differ for CS-KD and PS-KD (``artifacts.normalisations``).
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch

from cdlib import paths
from cdlib.core import confusion, feature_statistics
from cdlib.core.calibration import expected_calibration_error
from cdlib.core.readers import load_cifar_test
from cdlib.core.util import atomic_write_text, resolve_device
from cdlib.errors import ArgumentParser
from cdlib.experiments import dark_knowledge, paper, tables
from cdlib.experiments import distillation_results as dr
from cdlib.experiments.feature_analysis import FeatureAnalysis, interaction_claims
from cdlib.released import artifacts as art

# Released method names -> cdlib's Table 2 method names.
METHODS = {"baseline": "baseline", "cs-kd": "cskd", "ps-kd": "pskd", "cd-200": "cd200", "cd-300": "cd300"}
NORMALISATION_NOTE = ("Each checkpoint is evaluated twice: with the input statistics its own code trained with "
                      "(\"trained stats\": pytorch-cifar100's CIFAR-100 mean and std for baseline and CD; the CS-KD "
                      "and PS-KD codes normalise CIFAR-100 with CIFAR-10's, mean (0.4914, 0.4822, 0.4465), std "
                      "(0.2023, 0.1994, 0.2010)), and with pytorch-cifar100's for every method, as the authors' "
                      "analysis/evaluate_models.py does. ± is the population std over the runs (ddof=0), as the "
                      "paper prints it.")
LEAK_NOTE = ("The released CD models were trained with confusion targets built from the CIFAR-100 test set "
             "(the released code's leak): their test accuracy is not a held-out measurement, and evaluating them "
             "again cannot undo that.")


def test_set(data_root=None) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = load_cifar_test("cifar100", data_root)
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(labels)


@torch.no_grad()
def logits_of(model: torch.nn.Module, images: torch.Tensor, family: str, device, batch_size: int = 500) -> torch.Tensor:
    """(N, 100) float32 logits of uint8 (N, 3, H, W) ``images`` normalised as ``family``'s code trained."""
    mean, std = (torch.tensor(v, device=device).view(1, 3, 1, 1) for v in art.NORMALISATION[family])
    model = model.to(device).eval()
    out = [model((images[i:i + batch_size].to(device).float() / 255 - mean) / std).float().cpu()
           for i in range(0, len(images), batch_size)]
    return torch.cat(out)


def evaluation(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    top5 = logits.topk(5, dim=1).indices
    return {"top1": 100 * (top5[:, 0] == labels).double().mean().item(),
            "top5": 100 * (top5 == labels[:, None]).any(1).double().mean().item(),
            "nll": torch.nn.functional.cross_entropy(logits.double(), labels).item(),
            "ece": expected_calibration_error(logits, labels)}


def table2_long(folder: Path, data_root=None, device=None, log=print) -> pd.DataFrame:
    """One row per released Table 2 checkpoint and normalisation ("trained", "evaluate_models.py":
    ``artifacts.normalisations``): method, arch, run, network, normalisation, statistics, top-1, top-5, NLL,
    ECE, and the checkpoint's seconds (load and every pass; one pass per distinct statistics)."""
    device = resolve_device(device)
    images, labels = test_set(data_root)
    rows = []
    for (method, arch), files in art.found_table2(folder).items():
        for path in files:
            start = time.perf_counter()
            model = art.load_released_model(path, method, arch)
            results, by_statistics = {}, {}
            for normalisation, statistics in art.normalisations(method).items():
                values = art.NORMALISATION[statistics]
                if values not in by_statistics:
                    by_statistics[values] = evaluation(logits_of(model, images, statistics, device), labels)
                results[normalisation] = (statistics, by_statistics[values])
            seconds = time.perf_counter() - start
            log(f"  {method:<8} {arch:<12} {path.name}: top-1 " + ", ".join(
                f"{r['top1']:.2f} ({n} stats)" for n, (_, r) in results.items()) + f" ({seconds:.0f} s)")
            rows += [{"method": method, "arch": arch, "run": path.stem, "network": art.network_for(method, arch),
                      "normalisation": normalisation, "statistics": statistics, **result, "seconds": seconds}
                     for normalisation, (statistics, result) in results.items()]
    return pd.DataFrame(rows)


def _mean_pstd(values: pd.Series) -> str:
    # The paper's Table 2 and the authors' evaluate_models.py print the population std (ddof=0) of the 3 runs;
    # one run has no spread to show.
    return tables.format_mean_std(values.mean(), values.std(ddof=0) if len(values) > 1 else np.nan)


def table2_frame(long: pd.DataFrame) -> pd.DataFrame:
    """Table 2 from the released checkpoints, one row per method and network: the top-1 under the
    statistics the checkpoint was trained with and under the authors' evaluate_models.py's, each beside
    the paper's number (best epoch, mean of 3), then top-5, NLL and ECE under the trained statistics;
    every spread is the population std over the runs, as the paper prints it."""
    rows = []
    for (method, arch), group in long.groupby(["method", "arch"], sort=False):
        trained, script = (group[group["normalisation"] == n] for n in ("trained", "evaluate_models.py"))
        value = paper.table2(METHODS[method], arch)
        paper_top1 = np.nan if value is None else value
        row = {"method": method, "network": dr.arch_label(arch), "runs": len(trained),
               "trained stats": trained["statistics"].iloc[0],
               "top-1, trained stats (mean ± pop. std)": _mean_pstd(trained["top1"]),
               "top-1, evaluate_models.py stats (mean ± pop. std)": _mean_pstd(script["top1"]),
               "paper top-1": paper_top1,
               "trained - paper": trained["top1"].mean() - paper_top1,
               "evaluate_models.py - paper": script["top1"].mean() - paper_top1}
        for column, label in (("top5", "top-5"), ("nll", "NLL"), ("ece", "ECE %")):
            row[f"{label}, trained stats (mean ± pop. std)"] = _mean_pstd(trained[column])
        rows.append(row)
    return pd.DataFrame(rows)


def section_4_1(folder: Path, data_root=None, device=None, num_shuffles: int = 100) -> tuple[dict, dict]:
    """(measures, spectra) of Section 4.1: M from the released teacher, Q from the released baseline run1."""
    device = resolve_device(device)
    teacher_path, baseline_path = art.section_4_1_paths(folder)
    images, labels = test_set(data_root)
    teacher = art.load_released_model(teacher_path, "baseline", "resnet152")  # a pytorch-cifar100 network
    baseline = art.load_released_model(baseline_path, "baseline", "resnet18")
    m = confusion.class_mean_softmax(logits_of(teacher, images, "pytorch-cifar100", device).numpy(), labels.numpy(),
                                     art.CIFAR100_CLASSES, from_logits=True)
    predictions = logits_of(baseline, images, "pytorch-cifar100", device).argmax(1).numpy()
    q = confusion.hard_confusion(labels.numpy(), predictions, art.CIFAR100_CLASSES)
    measures = dark_knowledge.compare(m, q, num_shuffles)
    spectra = {"teacher M": confusion.offdiag_spectrum(m), "baseline Q": confusion.offdiag_spectrum(q)}
    return measures, spectra


def feature_analysis(folder: Path, which: str, n_images: int | None = None) -> FeatureAnalysis:
    """Each group's statistics of the released Omega ``which`` ("kd" or "cd"), read model by model."""
    omega = art.load_omega(folder, which, n_images)
    groups = {name: feature_statistics.group_statistics(omega, name, list(models)) for name, models in omega.groups.items()}
    return FeatureAnalysis(tensor=omega, groups=groups,
                           run_ids={g: [f"{omega.path.name}[{m}]" for m in r] for g, r in omega.groups.items()},
                           labels=np.zeros(0, dtype=np.int64), dataset="CIFAR-100 (released tensors)",
                           profile="released")


def claims(kd: FeatureAnalysis | None, cd: FeatureAnalysis | None, long: pd.DataFrame | None) -> list:
    """Claims 1 and 2 from the KD tensor, claim 5 from the re-evaluated Table 2 and the CD tensor, by the
    pipeline's rules (``interaction_claims``, ``distillation_results.claim5``)."""
    found = []
    if kd is not None:
        found += interaction_claims(kd)[:2]  # claim 3 needs each model's probabilities, not released
    if long is not None and not long.empty:
        trained = long[long["normalisation"] == "trained"]  # each network on the inputs it was trained for
        top1 = {(METHODS[m], arch): g["top1"].to_numpy() for (m, arch), g in trained.groupby(["method", "arch"])}
        if all((m, a) in top1 for a in set(long["arch"]) for pair in dr.CLAIM5_PAIRS for m in pair):
            where = "released checkpoints, CIFAR-100 test set under the statistics each trained with, 3 runs per cell "
            found.append(dr.claim5(top1, cd, where + LEAK_NOTE,
                                   what="released CD mean top-1 over runs (final checkpoints)", links=[]))
    return found


def write_figures(kd: FeatureAnalysis, cd: FeatureAnalysis, folder: Path) -> None:
    """Figures 1a/1b (KD tensor) and 3a/3b (CD tensor) from the released tensors, into ``folder``."""
    import matplotlib.pyplot as plt

    from cdlib.experiments import interaction_figures as figures
    for fig in (figures.plot_feature_frequency(kd.frequencies(), name="fig1a_feature_frequency", folder=folder),
                figures.plot_feature_frequency(kd.frequencies(), common_only=True, name="fig1b_common_features",
                                               folder=folder),
                figures.plot_feature_frequency(cd.frequencies(), name="fig3a_feature_frequency", folder=folder),
                figures.plot_features_per_image(cd.features_per_image(), name="fig3b_features_per_image",
                                                folder=folder)):
        plt.close(fig)


NOTEBOOK_PARTS = ("kd-tensor", "section-4-1", "table2", "cd-tensor")


def notebook_part(part: str, folder=None, data_root=None, device=None):
    """What a notebook shows from the released artifacts, as a table (and for the tensors their
    frequency figure): ``kd-tensor`` (notebook 03: Figure 1), ``section-4-1`` (04), ``table2`` and
    ``cd-tensor`` (05: Table 2, Figure 3). Without ``folder`` it says how to get the artifacts and
    returns None."""
    if part not in NOTEBOOK_PARTS:
        raise ValueError(f"part must be one of {NOTEBOOK_PARTS}, got {part!r}")
    if not folder:
        print(f"No released artifacts given. To see these numbers from the authors' own models, download them "
              f"({art.DOWNLOAD_HINT}) and set the notebook parameter released = FOLDER "
              f"(or run python -m cdlib released --folder FOLDER).")
        return None
    folder = Path(folder)
    if part == "table2":
        return table2_frame(table2_long(folder, data_root, device))
    if part == "section-4-1":
        measures, _ = section_4_1(folder, data_root, device)
        return pd.DataFrame([measures])
    from cdlib.experiments import interaction_figures
    result = feature_analysis(folder, "kd" if part == "kd-tensor" else "cd")
    interaction_figures.plot_feature_frequency(result.frequencies(), name=f"released_{part}_feature_frequency")
    return result.summary_table()


def report_section(frame: pd.DataFrame | None, measures: dict | None, kd: FeatureAnalysis | None,
                   cd: FeatureAnalysis | None, found: Sequence, folder: Path) -> str:
    lines = ["## From the authors' released artifacts", "",
             f"Computed by `python -m cdlib released --folder {folder}` from the authors' published checkpoints and "
             f"Interaction Tensors, with this repository's analysis code. {LEAK_NOTE}", ""]
    if frame is not None:
        lines += ["### Table 2, re-evaluated", "", NORMALISATION_NOTE, "", tables.to_markdown(frame)]
    if measures is not None:
        keep = {k: v for k, v in measures.items() if not k.endswith("shuffled std")}
        lines += ["### Section 4.1", "", tables.to_markdown(pd.DataFrame([keep]))]
    for name, analysis in (("KD tensor (Figure 1)", kd), ("CD tensor (Figure 3)", cd)):
        if analysis is not None:
            lines += [f"### {name}", "", tables.to_markdown(analysis.summary_table())]
    if found:
        lines += ["### Claims", "", "| claim | verdict | ours | rule |", "|---|---|---|---|"]
        lines += [f"| {c.number} | **{c.verdict}** | {c.ours} | {c.rule} |" for c in found]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m cdlib released", description=__doc__.splitlines()[0])
    parser.add_argument("--folder", type=Path, required=True, help="local copy of KangWooya/WDSL-tensors")
    parser.add_argument("--data-root", default=None, help="folder holding cifar-100-python (default $CDLIB_DATA)")
    parser.add_argument("--device", default=None, help="cpu | cuda (default: cuda if available)")
    parser.add_argument("--skip", nargs="*", default=[], choices=("table2", "section-4-1", "tensors"),
                        help="parts to leave out")
    parser.add_argument("--num-shuffles", type=int, default=100, help="shuffled-Q controls of Section 4.1")
    args = parser.parse_args(argv)
    if not args.folder.is_dir():
        raise art.ReleasedArtifactError(f"{args.folder} is not a folder; download the released artifacts there "
                                        f"first ({art.DOWNLOAD_HINT}).")
    out = paths.outputs() / "released"
    out.mkdir(parents=True, exist_ok=True)
    long = frame = measures = kd = cd = None
    if "table2" not in args.skip:
        print("Table 2: evaluating the released checkpoints on the CIFAR-100 test set", flush=True)
        long = table2_long(args.folder, args.data_root, args.device)
        frame = table2_frame(long)
        long.to_csv(out / "table2_runs.csv", index=False)
        tables.write_table(frame, "table2", out, caption="Table 2 from the released checkpoints (CIFAR-100 test set)")
    if "section-4-1" not in args.skip:
        print("Section 4.1: released teacher and baseline", flush=True)
        measures, spectra = section_4_1(args.folder, args.data_root, args.device, args.num_shuffles)
        tables.write_table(pd.DataFrame([measures]), "section_4_1", out, caption="Section 4.1 from the released models")
        np.savez(out / "section_4_1_spectra.npz", **spectra)
    if "tensors" not in args.skip:
        print("Figures 1 and 3: the released Interaction Tensors, model by model", flush=True)
        kd, cd = feature_analysis(args.folder, "kd"), feature_analysis(args.folder, "cd")
        tables.write_table(kd.summary_table(), "features_kd", out, caption="Released KD tensor")
        tables.write_table(cd.summary_table(), "features_cd", out, caption="Released CD tensor")
        write_figures(kd, cd, out)
    found = claims(kd, cd, long)
    (out / "claims.json").write_text(json.dumps([asdict(c) for c in found], indent=1))
    atomic_write_text(out / "REPORT_SECTION.md", report_section(frame, measures, kd, cd, found, args.folder))
    print(f"written to {out}")
    return 0
