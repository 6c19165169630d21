import json

import numpy as np
import pandas as pd
import pytest
import torch

from cdlib.experiments import plans, tables
from cdlib.core import runs
from cdlib.scaleout import executors
from cdlib.core.config import TrainConfig
from cdlib.experiments.profiles import get_profile

TINY = TrainConfig(name="tiny", dataset="synthetic", arch="resnet18", width=0.0625, epochs=2)


def test_config_hash_is_stable_and_json_round_trips():
    again = TrainConfig.from_dict(json.loads(json.dumps(TINY.to_dict())))
    assert again == TINY and again.run_id() == TINY.run_id()
    assert TINY.replace(seed=1).run_id() != TINY.run_id()
    with pytest.raises(ValueError, match="unknown config fields"):
        TrainConfig.from_dict({**TINY.to_dict(), "lr_typo": 1})


def test_get_or_train_caches_and_loads(monkeypatch, isolated_outputs):
    run = executors.train_run(TINY, progress=False)
    assert run.dir.parent == isolated_outputs / "runs" and run.dir.name == TINY.run_id()
    assert json.loads((run.dir / "config.json").read_text()) == TINY.to_dict()

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")
    monkeypatch.setattr(executors, "fit", no_training)
    again = executors.train_run(TINY, progress=False)
    assert again.summary == run.summary
    model = runs.find_run(TINY.run_id()).load_model()
    logits = model(torch.zeros(1, 3, 16, 16))
    assert logits.shape == (1, 20) and not model.training
    assert run.confusions("test").shape == (2, 20, 20)
    assert list(run.metrics["epoch"]) == [1, 2]


def test_folder_with_a_different_config_is_refused(isolated_outputs):
    folder = runs.run_dir(TINY)
    folder.mkdir(parents=True)
    stored = {**TINY.to_dict(), "lr": 0.05}
    (folder / "config.json").write_text(json.dumps(stored))
    (folder / "metrics.jsonl").write_text('{"epoch": 1}\n')
    with pytest.raises(runs.ConfigMismatchError, match="lr.*Nothing was changed"):
        executors.train_run(TINY, progress=False)
    # Nothing of the existing folder was touched.
    assert json.loads((folder / "config.json").read_text()) == stored
    assert (folder / "metrics.jsonl").read_text() == '{"epoch": 1}\n'


def test_find_run_of_unfinished_run_says_so(isolated_outputs):
    with pytest.raises(FileNotFoundError, match="no finished run"):
        runs.find_run("does-not-exist")


def test_frames_and_tables(isolated_outputs):
    finished = [executors.train_run(TINY.replace(seed=s), progress=False) for s in range(2)]
    frame = tables.runs_frame(finished)
    assert len(frame) == 2 and {"final_top1", "best_top1", "seed", "arch"} <= set(frame.columns)
    long = tables.metrics_frame(finished)
    assert len(long) == 4 and set(long["seed"]) == {0, 1}
    table = tables.summarise(frame, by=["arch"])
    values = frame["final_top1"].to_numpy()
    assert table.loc[0, "final_top1_mean"] == pytest.approx(values.mean())
    assert table.loc[0, "final_top1_std"] == pytest.approx(values.std(ddof=1))
    written = tables.write_table(table, "t", caption="tiny 50% test")
    assert pd.read_csv(written["csv"]).shape[0] == 1
    assert written["md"].read_text().startswith("| arch ")
    assert r"50\%" in written["tex"].read_text() and r"\begin{tabular}" in written["tex"].read_text()


def test_mean_std_ci_against_a_plain_computation():
    x = np.array([75.1, 75.9, 76.4])
    mean, std, ci, n = tables.mean_std_ci(x)
    plain_std = (sum((v - x.mean()) ** 2 for v in x) / 2) ** 0.5
    assert (mean, n) == (pytest.approx(x.mean()), 3) and std == pytest.approx(plain_std)
    assert ci == pytest.approx(4.302652729911275 * plain_std / 3 ** 0.5)  # t(0.975, 2 dof)
    assert tables.format_mean_std(75.123, 0.456) == "75.12 ± 0.46"
    assert np.isnan(tables.mean_std_ci([1.0])[1])


def test_profiles_and_plans():
    paper = get_profile("paper", announce=False)
    assert len(plans.feature_baselines(paper)) == 20 and len(plans.teachers(paper)) == 20
    table = plans.table_baselines(paper)
    assert len(table) == 12 and {c.epochs for c in table} == {200}
    # The first three feature baselines are Table 2's ResNet-18 runs: one run, trained once.
    assert len(plans.notebook_plan(paper, "01")) == 20 + 9 + 20
    # Table 2's baseline row and Table 1's CE / CD rows reuse those runs instead of training copies.
    assert plans.table2(paper)["baseline"] == table
    table1 = {label: config for label, config, _ in plans.table1(paper)}
    assert table1["CE 200 ep"] == table[0]
    assert table1["0.7:0.3 300 ep 3H3S6H3S15H"] == plans.table2(paper)["cd300"][0]
    students = plans.kd_students(paper)
    assert students[3].objective_args["teacher"] == plans.teachers(paper)[3].run_id()
    assert get_profile("smoke", announce=False).dataset == "synthetic"
    assert get_profile("quick", dataset="cifar10", announce=False).dataset == "cifar10"
    with pytest.raises(ValueError, match="unknown profile"):
        get_profile("huge")


def test_auto_profile_announces_its_choice(capsys):
    profile = get_profile("auto")
    assert profile.name == ("paper" if torch.cuda.is_available() else "smoke")
    assert "profile:" in capsys.readouterr().out


def test_a_config_json_edited_after_training_is_refused_by_every_reader(isolated_outputs):
    """A finished KD teacher whose config.json was edited (validation 0 -> 500) would pass for a
    teacher that held its student's validation images out; every reader refuses it and changes nothing."""
    from cdlib.experiments import distillation_results as dr
    teacher = executors.train_run(TINY.replace(name="teacher", epochs=1), progress=False)
    path = teacher.dir / runs.CONFIG
    path.write_text(json.dumps({**teacher.config.to_dict(), "validation": 500}))
    before = {p.name: p.read_bytes() for p in teacher.dir.iterdir()}
    student = TINY.replace(objective="kd", objective_args={"teacher": teacher.dir.name}, validation=500)
    readers = {
        "find_run": lambda: runs.find_run(teacher.dir.name),
        "load_teachers": lambda: runs.load_teachers([student]),
        "split_finished": lambda: runs.split_finished([teacher.config]),
        "analyses' load_runs": lambda: dr.load_runs([teacher.config]),
        "train_run": lambda: executors.train_run(teacher.config, progress=False),
        "train_plan": lambda: executors.train_plan([teacher.config], progress=False),
    }
    for name, read in readers.items():
        with pytest.raises((runs.ConfigMismatchError, executors.TrainingFailed),
                           match=f"{path}.*edited.*Restore config.json") as err:
            read()
        assert teacher.dir.name in str(err.value), name
    outcome = executors.execute([teacher.config], progress=False).outcomes[teacher.dir.name]
    assert (outcome.status, outcome.error) == ("failed", "ConfigMismatchError") and str(path) in outcome.message
    assert {p.name: p.read_bytes() for p in teacher.dir.iterdir()} == before
