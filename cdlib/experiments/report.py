"""``outputs/REPORT.md``: the paper's five claims against this reproduction, generated from the run store.

For every claim the report gives the paper's number, ours with its spread, the data
set and profile, the verdict and the rule that produced it, and relative links to the
figures and tables under ``outputs/`` that back it. Nothing in it is typed by hand:
it calls the claim functions of the analysis modules,

- claims 1-3: :func:`cdlib.experiments.feature_analysis.interaction_claims` on
  :func:`cdlib.experiments.feature_analysis.analyse_profile` (baselines, KD students, teachers);
- claim 4: :func:`cdlib.experiments.dark_knowledge.confusion_claim` on :func:`cdlib.experiments.dark_knowledge.analyse`;
- claim 5: :func:`cdlib.experiments.distillation_results.cd_claim`, with the baseline-vs-CD
  Interaction Tensor of :func:`cdlib.experiments.feature_analysis.analyse_profile` (baseline vs CD) when
  those models exist.

The report never trains: a claim whose runs are not all finished, whose module is
missing, or whose analysis raises, is reported as "not measured" with the reason.

    python -m cdlib report --profile smoke          # writes $CDLIB_OUTPUTS/REPORT.md
"""
from __future__ import annotations

import os
import traceback
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path

from cdlib import __version__, paths
from cdlib.experiments import claims, paper, plans
from cdlib.core import runs
from cdlib.experiments.claims import Claim, not_measured
from cdlib.experiments.profiles import Profile, add_profile_arguments, get_profile, profile_from_args
from cdlib.errors import ArgumentParser

CLAIM_NUMBERS = (1, 2, 3, 4, 5)

# The notebook that measures each claim: its figures and tables (names start with its number)
# are linked when the claim function gives no links of its own.
NOTEBOOK_OF_CLAIM = {1: "03", 2: "03", 3: "03", 4: "04", 5: "05"}

# What the paper reports for each claim (Sections 3.3-4.4, from cdlib.experiments.paper), shown
# when a claim could not be measured.
_F = {g: paper.KD_TENSOR["features |F|", g] for g in paper.KD_TENSOR_GROUPS}
_E = {g: paper.KD_TENSOR["mean frequency E[F]", g] for g in paper.KD_TENSOR_GROUPS}
_SHARED = {g: paper.KD_TENSOR["features shared by the pair", frozenset({"student", g})]
           for g in ("baseline", "teacher")}
PAPER_NUMBERS = {
    1: f"|F| baseline {_F['baseline']} vs student {_F['student']} and teacher {_F['teacher']}; mean feature "
       f"frequency E[F] {_E['baseline']} vs {_E['student']} / {_E['teacher']} (CIFAR-100 test set, "
       "20 + 20 + 20 models)",
    2: f"|F| student {_F['student']} vs baseline {_F['baseline']}; E[F] {_E['student']} vs {_E['baseline']}; "
       f"features shared student-teacher {_SHARED['teacher']}, student-baseline {_SHARED['baseline']}",
    3: "positive relation between confidence and number of active features for baselines (Fig. 2a, no "
       "coefficient reported); the student's density is narrower (Fig. 2b)",
    4: f"{paper.confusion_similarity_text()} (teacher M vs baseline Q)",
    5: f"CD-300 ResNet-34 {paper.table2('cd300', 'resnet34')} vs PS-KD {paper.table2('pskd', 'resnet34')} and "
       f"CS-KD {paper.table2('cskd', 'resnet34')} (+{paper.resnet34_margin():.1f}); fewer, more frequent features "
       "than the baseline (Section 4.3)",
}

MAX_REASON = 400


# ---------------------------------------------------------------------------
# Collecting the claims


def _unfinished(configs, root: Path | None = None) -> list[str]:
    return runs.split_finished(plans.unique(list(configs)), root)[1]


def _missing_reason(missing: Sequence[str], total: int, notebook: str) -> str:
    shown = ", ".join(missing[:3]) + (", ..." if len(missing) > 3 else "")
    return f"{len(missing)} of {total} required runs not trained ({shown}); run notebook {notebook} first"


def _claims_1_to_3(profile: Profile, device=None, data_root=None) -> list[Claim]:
    from cdlib.experiments import feature_analysis
    required = [c for g in feature_analysis.KD_GROUPS for c in feature_analysis.GROUP_PLANS[g](profile)]
    missing = _unfinished(required)
    if missing:
        return [not_measured(n, _missing_reason(missing, len(plans.unique(required)), "03"))
                for n in (1, 2, 3)]
    result = feature_analysis.analyse_profile(profile, device=device, data_root=data_root)
    return list(feature_analysis.interaction_claims(result))


def _claim_4(profile: Profile, device=None, data_root=None) -> list[Claim]:
    from cdlib.experiments import dark_knowledge
    required = dark_knowledge.required_runs(profile)
    missing = _unfinished(required)
    if missing:
        return [not_measured(4, _missing_reason(missing, len(plans.unique(required)), "04"))]
    result = dark_knowledge.analyse(profile, data_root=data_root, over_epochs=False)
    return [dark_knowledge.confusion_claim(result)]


def _claim_5(profile: Profile, device=None, data_root=None) -> list[Claim]:
    from cdlib.experiments import distillation_results
    required = [c for cs in plans.table2(profile).values() for c in cs]
    missing = _unfinished(required)
    if missing:
        return [not_measured(5, _missing_reason(missing, len(plans.unique(required)), "05"))]
    features = None
    feature_runs = plans.feature_baselines(profile) + plans.cd_feature_models(profile)
    if not _unfinished(feature_runs):
        from cdlib.experiments.feature_analysis import analyse_profile
        features = analyse_profile(profile, ("baseline", "cd"), device=device, data_root=data_root)
    return [distillation_results.cd_claim(profile, features=features)]


# Which claims each collector answers; collect_claims calls them in this order.
COLLECTORS: list[tuple[tuple[int, ...], Callable[..., list[Claim]]]] = [
    ((1, 2, 3), _claims_1_to_3),
    ((4,), _claim_4),
    ((5,), _claim_5),
]


def _failure(err: BaseException) -> str:
    where = traceback.extract_tb(err.__traceback__)[-1] if err.__traceback__ else None
    at = f" (at {Path(where.filename).name}:{where.lineno})" if where else ""
    text = f"analysis failed: {type(err).__name__}: {err}{at}"
    return text if len(text) <= MAX_REASON else text[: MAX_REASON - 3] + "..."


def collect_claims(profile: Profile, device=None, data_root=None, collectors=None) -> list[Claim]:
    """One :class:`Claim` per claim number 1-5, in order. A collector that raises, or that
    leaves out a number it answers for, yields "not measured" with the reason."""
    found: dict[int, Claim] = {}
    for numbers, collect in (COLLECTORS if collectors is None else collectors):
        try:
            for c in collect(profile, device=device, data_root=data_root):
                if c.number in numbers:
                    found[c.number] = c
            reason = "the analysis returned no claim with this number"
        except Exception as err:  # noqa: BLE001 - the report must never crash
            reason = _failure(err)
        for n in numbers:
            found.setdefault(n, not_measured(n, reason))
    return [found.get(n, not_measured(n, "no analysis collects this claim")) for n in CLAIM_NUMBERS]


# ---------------------------------------------------------------------------
# Rendering


def _outputs_listing(outputs: Path) -> dict[str, list[str]]:
    """Relative paths of the figures (PNG) and tables (Markdown) under ``outputs``, by notebook number."""
    listing: dict[str, list[str]] = {}
    for folder, ext in (("figures", "png"), ("tables", "md")):
        for path in sorted((outputs / folder).glob(f"*.{ext}")):
            listing.setdefault(path.name[:2], []).append(f"{folder}/{path.name}")
    return listing


def claim_links(claim: Claim, outputs: Path) -> list[str]:
    """The claim's links that exist under ``outputs``; when it names none that exist, every
    figure and table of the notebook that measures it."""
    existing = [link for link in claim.links if (outputs / link).is_file()]
    if existing:
        return existing
    return _outputs_listing(outputs).get(NOTEBOOK_OF_CLAIM[claim.number], [])


def _md(text: str) -> str:
    """Text safe inside a Markdown table cell."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def _link(path: str) -> str:
    return f"[{Path(path).name}]({path})"


def render(profile: Profile, claim_list: Sequence[Claim], outputs: Path) -> str:
    """The Markdown text of the report."""
    finished = sum(1 for d in (outputs / "runs").glob("*") if runs.is_finished(d)) if (outputs / "runs").is_dir() else 0
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        "# Reproduction report: Kang & Kim, \"What Do Students Learn? A Feature-Level Analysis of Dark Knowledge\"",
        "",
        f"Generated by `python -m cdlib report {profile.cli_args()}` "
        f"(cdlib {__version__}, {now}) from the run store `{outputs / 'runs'}` ({finished} finished runs). "
        f"Profile **{profile.label}** ({profile.description}), data set **{profile.dataset}**. "
        "Do not edit by hand: rerun the command.",
        "",
        "<details><summary>The resolved profile</summary>",
        "",
        "```toml",
        profile.to_toml().rstrip(),
        "```",
        "</details>",
        "",
        "Each verdict is computed from this run's numbers by the rule stated with it. \"not measured\" means "
        "the inputs were missing (runs not trained, or the analysis failed); the reason is given as its rule.",
        "",
        "| claim | statement | verdict |",
        "|---|---|---|",
    ]
    lines += [f"| {c.number} | {_md(c.statement)} | **{c.verdict}** |" for c in claim_list]
    for c in claim_list:
        links = claim_links(c, outputs)
        lines += [
            "",
            f"## Claim {c.number}: {c.statement}",
            "",
            f"- **Paper:** {c.paper or PAPER_NUMBERS[c.number]}",
            f"- **This run:** {c.ours or 'not measured'}",
            f"- **Data and profile:** {c.source or f'{profile.dataset}, profile {profile.label}'}",
            f"- **Verdict:** **{c.verdict}**",
            f"- **{'Rule' if c.verdict != claims.NOT_MEASURED else 'Why not measured'}:** {c.rule}",
            f"- **Figures and tables:** {', '.join(_link(p) for p in links) if links else 'none under outputs/'}",
        ]
    listing = _outputs_listing(outputs)
    lines += ["", "## All figures and tables under outputs/", ""]
    if not listing:
        lines.append("None yet: run the notebooks.")
    for notebook, files in listing.items():
        lines.append(f"- notebook {notebook}: " + ", ".join(_link(p) for p in files))
    released = outputs / "released" / "REPORT_SECTION.md"  # written by python -m cdlib released --folder PATH
    lines += [""] + ([released.read_text().rstrip()] if released.is_file() else [
        "## From the authors' released artifacts", "",
        "Not computed yet: download the authors' checkpoints and Interaction Tensors (Hugging Face dataset "
        "`KangWooya/WDSL-tensors`) and run `python -m cdlib released --folder PATH`; this section then holds "
        "Table 2, Section 4.1, the Figure 1/3 statistics and claims 1, 2 and 5 computed from them."])
    return "\n".join(lines) + "\n"


def write_report(profile: Profile, device=None, data_root=None) -> Path:
    """Collect the five claims for ``profile`` (a :class:`Profile` or a profile name) from the run
    store and write ``outputs/REPORT.md``; return its path. Never trains, never raises for a claim."""
    if isinstance(profile, str):
        profile = get_profile(profile, announce=False)
    outputs = paths.outputs()
    outputs.mkdir(parents=True, exist_ok=True)
    text = render(profile, collect_claims(profile, device=device, data_root=data_root), outputs)
    path = outputs / "REPORT.md"
    tmp = path.with_suffix(f".md.tmp{os.getpid()}")
    tmp.write_text(text)
    tmp.replace(path)
    return path


def main(argv: Sequence[str] | None = None) -> Path:
    parser = ArgumentParser(prog="python -m cdlib report", description=__doc__.split("\n\n")[0])
    add_profile_arguments(parser)
    parser.add_argument("--device", default=None, help="device for the feature analyses (default: cuda if available)")
    parser.add_argument("--data-root", default=None, help="folder holding the data sets (default: $CDLIB_DATA)")
    args = parser.parse_args(argv)
    profile = profile_from_args(args)
    path = write_report(profile, device=args.device, data_root=args.data_root)
    print(path)
    return path

