"""``docs/RESULTS.md`` is generated: the page from a run store of fake finished runs (no training)
shows what is finished and what is missing, the tables with their numbers, the verdicts and the time."""
from __future__ import annotations

import re
from dataclasses import replace

import numpy as np
import pytest

from cdlib.__main__ import main as cdlib_main
from cdlib.experiments import plans, results
from cdlib.experiments.profiles import get_profile
from test_distillation_results import BASE, SEED_OFFSETS, write_fake_run

TEACHER_TOP1 = 70.0


@pytest.fixture
def store(tmp_path, monkeypatch):
    """Every run of the cpu profile's page finished, but the second teacher."""
    monkeypatch.setenv("CDLIB_OUTPUTS", str(tmp_path))
    profile = get_profile("cpu")
    for config in results.plan(profile)[:-1]:
        top1 = TEACHER_TOP1 if config.arch == profile.teacher_arch else BASE[
            next(m for m in results.methods(profile)
                 if plans.method_config(profile, m, config.arch, config.seed) == config)]
        write_fake_run(tmp_path / "runs", config, top1 + SEED_OFFSETS[config.seed], num_classes=10)
    return profile


def test_the_page_reports_every_finished_run_and_lists_the_missing(store):
    text = results.render(store)
    missing = results.plan(store)[-1]
    assert "23 of the page's 24 runs are finished" in text and f"`{missing.run_id()}`" in text
    assert "python -m cdlib results --profile cpu" in text and "This is not the paper's experiment" in text
    assert "validation = 5000" in text  # the resolved profile
    cells = re.sub(r" {2,}", " ", text)  # the Markdown tables pad their cells to the column width
    for label in ("Baseline (CE)", "Label smoothing", "Baseline (CE), 300-epoch budget", "Label smoothing, "
                  "300-epoch budget", "CS-KD", "PS-KD", "CD-200", "CD-300, held-out validation source",
                  "CD-300, eval-mode training source", "CD-300, test-set source (leaks test labels)"):
        assert f"| {label} | 2 |" in cells, label
    assert "| Baseline (CE) | 2 | 8 | 60.30 ± 0.42 |" in cells  # mean and sample std of 60.0 and 60.6
    assert "| CD-300 | 2 | 12 |" in cells and "| Baseline (CE), 300-epoch budget | 2 | 12 |" in cells


def test_the_leak_and_the_verdicts_follow_the_numbers(store):
    cells = results.dr.table2_runs(store, methods=results.methods(store), finished_only=True)
    leak = results.dr.leak_table(store, cells=cells)
    final = leak[leak["metric"] == "final top-1"].set_index("leak-free source")["difference (test - leak-free)"]
    assert final.to_dict() == pytest.approx({"training batches": 1.5, "eval-mode training images": 1.0,
                                             "held-out validation": 0.5})
    verdicts = results.verdicts(store, cells).set_index("question")
    assert set(verdicts["epochs"]) == {"12 vs 12 epochs", "8 vs 8 epochs"}  # every row at one budget
    row = verdicts.loc["leak-free CD-300 beats Baseline (CE), 300-epoch budget"]
    # The paper has no 300-epoch baseline: its difference is CD-300 at 300 against the baseline at 200, and says so.
    assert row["ours (difference)"] == pytest.approx(2.8) and row["paper (difference)"] == pytest.approx(77.13 - 75.86)
    assert row["paper epochs"] == "300 vs 200 epochs" and row["epochs"] == "12 vs 12 epochs"
    # Both groups are {x, x + 0.6}: Welch's t = 2.8 / 0.42 on 2 degrees of freedom, p < 0.05; 1 point is not.
    assert row["verdict"] == "holds here" and float(row["p (Welch)"]) < 0.05
    assert verdicts.loc["leak-free CD-300 beats PS-KD", "verdict"] == "does not hold here"
    assert verdicts.loc["leak-free CD-200 beats CS-KD", "paper epochs"] == "200 vs 200 epochs"
    assert "teachers" not in " ".join(verdicts.index)  # the teachers train longer: a check, not a verdict
    teachers = results.teacher_check(store, cells).iloc[0]
    assert teachers["n"] == "1 / 2" and "needs >= 2 seeds" in teachers["note"] and "24 epochs" in teachers["teacher"]


def test_a_verdict_of_unequal_budgets_never_holds(store):
    """The page's rule on a pair it does not plan: CD-300 (12 epochs) far above the 8-epoch baseline."""
    row = results._verdict(store, "CD-300 beats the 8-epoch baseline", np.array([70.0, 70.6]), np.array([60.0, 60.6]),
                           ("cd300", "baseline"))
    assert row["verdict"] == "not counted: 12 vs 8 epochs" and float(row["p (Welch)"]) < 0.05


def test_time_is_measured_and_projected_for_every_notebook(store):
    timing = results.timing_table(store)
    assert set(timing["objective"]) == {"ce", "ls", "cskd", "pskd", "cd"} and (timing["s / epoch (fastest)"] == 10.0).all()
    projection = results.projection_table(store).set_index("notebook")
    total = projection.loc["all"]
    assert total["runs"] == len(plans.combined_plan(store, list(results.NOTEBOOKS)))
    # Every network is measured (10 s per epoch), so every run projects to 10 s per epoch; KD's teacher
    # pass, an objective not measured, adds a third of an epoch.
    extra_epochs = sum(c.epochs for c in plans.kd_students(store))
    assert total["projected h"] * 3600 == pytest.approx(10 * total["epochs"] + 10 / 3 * extra_epochs)


def test_the_command_writes_the_page(store, tmp_path):
    output = tmp_path / "docs" / "RESULTS.md"
    assert cdlib_main(["results", "--profile", "cpu", "--output", str(output)]) == 0
    assert output.read_text().startswith("# Results on real data: profile cpu")


def test_a_profile_without_validation_has_no_holdout_row(store):
    quick = replace(store, validation=0)
    assert "cd300-holdout" not in results.methods(quick) and "cd300-train_eval" in results.methods(quick)


class ReadTestSelected(AssertionError):
    pass


def test_no_verdict_reads_a_test_selected_number(tmp_path, monkeypatch):
    """Every verdict (the page's rows, the teacher check, claim 5) reads final-epoch or validation-selected
    numbers only: summaries that refuse their test-selected keys (``tables.TEST_SELECTED``, and a
    ``selected_*`` chosen on test data) change nothing. The refusal itself works: Table 2 reads them."""
    from cdlib.core import runs
    from cdlib.experiments import distillation_results as dr, tables
    from test_distillation_results import CLEAR_WIN, fake_profile, fill_table2

    class Guarded(dict):
        def _check(self, key):
            chosen_on_test = key.startswith("selected_") and dict.get(self, "selection") != "validation"
            if key in tables.TEST_SELECTED or chosen_on_test:
                raise ReadTestSelected(f"a verdict read the test-selected {key!r}")

        def __getitem__(self, key):
            self._check(key)
            return dict.__getitem__(self, key)

        def get(self, key, default=None):
            self._check(key)
            return dict.get(self, key, default)

    profile = fake_profile()
    fill_table2(tmp_path, profile, base=CLEAR_WIN)
    expected = dr.cd_claim(profile, root=tmp_path)
    read = runs.read_summary
    monkeypatch.setattr(runs, "read_summary", lambda folder: Guarded(read(folder)))
    assert dr.cd_claim(profile, root=tmp_path) == expected
    with pytest.raises(ReadTestSelected):
        dr.table2_frame(profile, root=tmp_path)

    monkeypatch.setenv("CDLIB_OUTPUTS", str(tmp_path / "page"))
    page = get_profile("cpu")
    for config in results.plan(page):
        write_fake_run(tmp_path / "page" / "runs", config, 60.0 + SEED_OFFSETS[config.seed], num_classes=10)
    cells = results.dr.table2_runs(page, methods=results.methods(page), finished_only=True)
    assert len(results.verdicts(page, cells)) and len(results.teacher_check(page, cells))
