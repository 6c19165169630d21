"""Tests of cdlib.experiments.report: REPORT.md from a fake run store, never training, never crashing."""
import inspect

import matplotlib

matplotlib.use("Agg")

import pytest

from cdlib.experiments import claims, dark_knowledge, report
from cdlib import paths
from cdlib.experiments.claims import Claim
from cdlib.experiments.profiles import get_profile

from test_dark_knowledge import FakeData, fake_store, tiny_profile


@pytest.fixture
def fake_data(monkeypatch):
    """analyse loads its labels from this fake data set instead of the real one."""
    import cdlib.core.data
    monkeypatch.setattr(cdlib.core.data, "load_dataset", lambda name, root=None, download=False: FakeData())


def sections(text):
    """Claim number -> its section of the report."""
    parts = text.split("\n## Claim ")[1:]
    return {int(p.split(":", 1)[0]): p for p in parts}


def test_signature_is_the_one_notebook_05_calls():
    params = list(inspect.signature(report.write_report).parameters.values())
    assert [p.name for p in params] == ["profile", "device", "data_root"]
    assert params[1].default is None and params[2].default is None


def test_empty_store_reports_every_claim_not_measured():
    path = report.write_report(get_profile("smoke", announce=False))
    assert path == paths.outputs() / "REPORT.md"
    text = path.read_text()
    found = sections(text)
    assert sorted(found) == [1, 2, 3, 4, 5]
    for n, section in found.items():
        assert "**Verdict:** **not measured**" in section, n
        assert "not trained" in section, n                       # the reason
        assert report.PAPER_NUMBERS[n][:20] in section, n        # the paper's number is still shown
    assert "| 4 |" in text and "synthetic" in text
    assert not any(paths.runs().glob("*/summary.json"))          # nothing was trained


def test_claim_4_measured_others_not_and_links_exist(fake_data):
    profile = tiny_profile()
    fake_store(profile)
    # One figure of notebook 04 exists, one table of notebook 03 exists.
    figure = paths.figures() / f"{dark_knowledge.FIGURES['heatmaps']}.png"
    table = paths.tables() / "03_kd_summary.md"
    for f in (figure, table):
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text("x")
    text = report.write_report(profile).read_text()
    found = sections(text)
    claim4 = found[4]
    assert "**Verdict:** **supported**" in claim4
    assert "Pearson" in claim4 and "±" in claim4 and "min z" in claim4
    assert "profile tiny" in claim4
    assert f"(figures/{figure.name})" in claim4
    for link in dark_knowledge.FIGURES.values():
        if link != dark_knowledge.FIGURES["heatmaps"]:
            assert link not in claim4  # only outputs that exist are linked
    for n in (1, 2, 3, 5):
        assert "**Verdict:** **not measured**" in found[n]
    assert "(tables/03_kd_summary.md)" in found[1]            # the measuring notebook's outputs
    assert "notebook 03: [03_kd_summary.md](tables/03_kd_summary.md)" in text


def test_failing_or_incomplete_analyses_become_not_measured():
    def broken(profile, device=None, data_root=None):
        raise RuntimeError("boom | with a pipe")

    def wrong_number(profile, device=None, data_root=None):
        return [Claim(2, "p", "o", claims.SUPPORTED, "r", "s")]

    def fine(profile, device=None, data_root=None):
        return [Claim(4, "p4", "o4", claims.NOT_SUPPORTED, "r4", "s4", ["figures/none.png"])]

    profile = get_profile("smoke", announce=False)
    found = report.collect_claims(profile, collectors=[((1, 3), broken), ((2, 5), wrong_number), ((4,), fine)])
    assert [c.number for c in found] == [1, 2, 3, 4, 5]
    assert found[0].verdict == claims.NOT_MEASURED and "RuntimeError: boom" in found[0].rule
    assert found[1].verdict == claims.SUPPORTED
    assert found[4].verdict == claims.NOT_MEASURED and "no claim with this number" in found[4].rule
    assert found[3].ours == "o4"
    text = report.render(profile, found, paths.outputs())
    assert "RuntimeError: boom \\| with a pipe" not in text  # rules are not in a table: no escaping there
    assert report._md("a | b\nc") == "a \\| b c"
    assert "none under outputs/" in sections(text)[4]  # a link to a missing file is dropped


def test_cli_writes_the_report(capsys):
    path = report.main(["--profile", "smoke"])
    assert path.is_file() and str(path) in capsys.readouterr().out
    text = path.read_text()
    assert "`python -m cdlib report --profile smoke`" in text and 'dataset = "synthetic"' in text  # the resolved profile
