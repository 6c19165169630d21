"""Profiles are TOML files: the built-in ones and a user's, with overrides that work the same from every
command line, from ``get_profile`` and from the notebooks' parameters; wrong keys and values are named."""
from __future__ import annotations

import json

import pytest

from cdlib.__main__ import main as cdlib_main
from cdlib.core.data import DataError
from cdlib.experiments import pipeline, plans
from cdlib.experiments.profiles import builtin_names, get_profile, load_profile, parse_override
from cdlib.errors import ConfigError


@pytest.mark.parametrize("name", builtin_names())
def test_a_resolved_profile_written_as_toml_reads_back_equal(tmp_path, name):
    profile = get_profile(name, overrides={"epochs": 3})
    path = tmp_path / "mine.toml"
    path.write_text(profile.to_toml())
    again = load_profile(path)
    assert {k: v for k, v in vars(again).items() if k not in ("name", "source", "overrides")} == \
        {k: v for k, v in vars(profile).items() if k not in ("name", "source", "overrides")}
    assert [c.run_id() for c in plans.notebook_plan(again, "05")] == [c.run_id() for c in plans.notebook_plan(profile, "05")]


def test_a_user_profile_starts_from_a_builtin_and_overrides_apply_last(tmp_path):
    path = tmp_path / "my-profile.toml"
    path.write_text('base = "quick"\ndataset = "cifar10"\nwidth = 0.25\n')
    profile = get_profile(str(path), overrides=["epochs=15", "table_archs=resnet18,resnet34"])
    assert (profile.name, profile.dataset, profile.width, profile.epochs) == ("my-profile", "cifar10", 0.25, 15)
    assert profile.table_archs == ("resnet18", "resnet34") and profile.seeds == get_profile("quick").seeds
    assert profile.cli_args() == f"--profile {path} --set epochs=15 table_archs=resnet18,resnet34"
    assert "width = 0.25" in profile.to_toml() and profile.label == "my-profile (epochs=15, table_archs=resnet18,resnet34)"


def test_override_values_are_read_as_toml_or_else_as_plain_strings():
    assert parse_override("width=0.25") == ("width", 0.25)
    assert parse_override("epochs = 15") == ("epochs", 15)
    assert parse_override("dataset=cifar10") == ("dataset", "cifar10")
    assert parse_override("dataset=imagefolder:/data/x") == ("dataset", "imagefolder:/data/x")
    assert parse_override('table_archs=["resnet18"]') == ("table_archs", ["resnet18"])


@pytest.mark.parametrize("text, overrides, message", [
    ('base = "quick"\nwidht = 0.5\n', None, "unknown profile key 'widht'"),
    ('base = "quick"\n', ["epochs=1.5"], "'epochs' must be a whole number, got 1.5"),
    ('base = "quick"\n', ["width=-1"], "width must be a positive number"),
    ('base = "quick"\n', ["table_archs=resnet19"], "must be one of resnet18"),
    ('base = "quick"\n', ["dataset=cifar1000"], "dataset must be one of cifar100"),
    ('base = "quick"\n', ["seeds=0"], "'seeds' must be >= 1"),
    ('base = "quick"\n', ["nonsense"], "is not KEY=VALUE"),
    ('dataset = "cifar10"\n', None, "profile keys ['description', 'width'"),
    ('base = "mine"\n', None, "'base' must name another profile"),
    ('width = [', None, "cannot read profile file"),
])
def test_a_wrong_profile_is_a_config_error_that_names_the_key(tmp_path, text, overrides, message):
    path = tmp_path / "mine.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        get_profile(str(path), overrides=overrides)
    assert message in str(err.value)


def test_unknown_profiles_and_missing_files_are_named():
    with pytest.raises(ConfigError, match="unknown profile 'fast'.*cpu"):
        get_profile("fast")
    with pytest.raises(ConfigError, match="profile file .*nope.toml does not exist"):
        get_profile("nope.toml")


def test_set_works_the_same_on_the_command_lines(tmp_path, capsys):
    assert cdlib_main(["plan", "--profile", "cpu", "--set", "epochs=4", "width=0.125", "--notebook", "01", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    students = {r["config"]["epochs"] for r in rows if r["config"]["objective"] == "ce" and r["config"]["arch"] == "resnet18"}
    teachers = {r["config"]["epochs"] for r in rows if r["config"]["arch"] == "resnet34"}
    assert students == {4} and teachers == {24}  # the cpu profile's teachers train their own teacher_epochs
    assert {r["config"]["width"] for r in rows if r["config"]["arch"] == "resnet18"} == {0.125}
    assert cdlib_main(["plan", "--profile", "cpu", "--set", "epochz=4", "--all"]) == 2
    assert "unknown profile key 'epochz'" in capsys.readouterr().err


def test_the_pipeline_hands_the_profile_and_overrides_to_every_notebook(monkeypatch, tmp_path):
    seen = []
    monkeypatch.setattr(pipeline, "run_notebook", lambda nb, parameters, kernel: seen.append(parameters) or nb)
    assert pipeline.main(["--profile", "smoke", "--set", "epochs=2", "--only", "01,02"]) == 0
    assert seen == [{"profile": "smoke", "overrides": {"epochs": 2}, "dataset": None, "data_root": None,
                     "device": None, "released": None}] * 2
    for notebook in pipeline.notebooks():  # and each notebook takes them as parameters
        cells = json.loads(notebook.read_text())["cells"]
        source = "".join(next(c for c in cells if "parameters" in c["metadata"].get("tags", []))["source"])
        assert "overrides = {}" in source and "profile = " in source, notebook.name


def test_the_pipeline_downloads_missing_cifar_once_with_the_flag(monkeypatch, tmp_path):
    """The downloader is replaced: it writes the files a real download leaves; offline is an OSError."""
    from cdlib.core import readers
    calls = []

    def fake_download(name, base):
        calls.append((name, base))
        folder = base / "cifar-10-batches-py"
        folder.mkdir(parents=True)
        (folder / "test_batch").write_bytes(b"")
    monkeypatch.setattr(readers, "download_cifar", fake_download)
    monkeypatch.setattr(pipeline, "run_notebook", lambda nb, parameters, kernel: nb)
    root = tmp_path / "data"
    args = ["--profile", "cpu", "--data-root", str(root), "--only", "01", "--download"]
    assert pipeline.main(args) == 0 and calls == [("cifar10", root)]
    assert pipeline.main(args) == 0 and len(calls) == 1  # there now: not fetched again
    calls.clear()
    assert pipeline.main(args[:-1] + ["--set", "dataset=cifar100"]) == 0 and calls == []  # no flag, no download

    def offline(name, base):
        raise OSError("[Errno -3] Temporary failure in name resolution")
    monkeypatch.setattr(readers, "download_cifar", offline)
    with pytest.raises(DataError, match="cifar100 not found, and downloading it failed .*name resolution.*Put the"):
        pipeline.main(args + ["--set", "dataset=cifar100"])
