"""``python -m cdlib publish``: the committable copy of an outputs folder (here a hand-made one)."""
from __future__ import annotations

import base64
import io

import matplotlib
import nbformat
import pytest
from PIL import Image

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from cdlib.__main__ import main as cdlib_main  # noqa: E402
from cdlib.experiments import figures, publish  # noqa: E402


def png_bytes(width_in: float, dpi: int) -> bytes:
    fig, ax = plt.subplots(figsize=(width_in, 2))
    ax.plot([0, 1], [1, 0])
    out = io.BytesIO()
    fig.savefig(out, format="png", dpi=dpi)
    plt.close(fig)
    return out.getvalue()


@pytest.fixture
def outputs(tmp_path):
    """An outputs folder as the pipeline leaves it: report, tables, 300-dpi figures, an executed notebook."""
    out = tmp_path / "outputs"
    (out / "tables").mkdir(parents=True)
    (out / "REPORT.md").write_text("# Report\n\n![fig](figures/05_fig.png) [table](tables/05_table2.md)\n")
    for ext in ("md", "csv", "tex"):
        (out / "tables" / f"05_table2.{ext}").write_text("| a |\n|---|\n| 1 |\n")
    fig, ax = plt.subplots(figsize=(7, 2.6))
    ax.plot([0, 1], [0, 1])
    figures.save_figure(fig, "05_fig", out / "figures")
    plt.close(fig)
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_markdown_cell("## Table 2"),
                nbformat.v4.new_code_cell("print(1)", outputs=[
                    nbformat.v4.new_output("stream", name="stdout", text="top-1 61.25\n"),
                    nbformat.v4.new_output("display_data", data={
                        "image/png": base64.b64encode(png_bytes(4, 100)).decode(), "text/plain": "<Figure>"})])]
    (out / "notebooks").mkdir()
    nbformat.write(nb, out / "notebooks" / "05_confusion_distill.ipynb")
    return out


def test_publish_copies_report_tables_small_figures_and_notebooks_as_markdown(outputs, tmp_path, monkeypatch):
    monkeypatch.setenv("CDLIB_OUTPUTS", str(outputs))
    target = tmp_path / "docs" / "cpu-profile"
    assert cdlib_main(["publish", "--to", str(target), "--width", "600"]) == 0
    names = {p.relative_to(target).as_posix() for p in target.rglob("*") if p.is_file()}
    assert {"README.md", "REPORT.md", "tables/05_table2.md", "figures/05_fig.png",
            "notebooks/05_confusion_distill.md"} <= names
    assert not any(n.endswith((".pdf", ".csv", ".tex", ".ipynb")) for n in names)
    with Image.open(outputs / "figures" / "05_fig.png") as big, Image.open(target / "figures" / "05_fig.png") as small:
        assert big.width > 1500 and small.width == 600 and small.height == round(big.height * 600 / big.width)
    page = (target / "notebooks" / "05_confusion_distill.md").read_text()
    assert "## Table 2" in page and "top-1 61.25" in page
    images = [n for n in names if n.startswith("notebooks/05_confusion_distill_files/")]
    assert len(images) == 1 and images[0].split("/", 1)[1] in page  # the Markdown links the image it wrote
    assert (target / "REPORT.md").read_text() == (outputs / "REPORT.md").read_text()
    index = (target / "README.md").read_text()
    assert publish.MARK in index and "notebooks/05_confusion_distill.md" in index


def test_publish_replaces_its_own_folder_and_refuses_any_other(outputs, tmp_path):
    target = tmp_path / "published"
    publish.publish(target, outputs)
    (target / "figures" / "stale.png").write_bytes(b"old")
    publish.publish(target, outputs)
    assert not (target / "figures" / "stale.png").exists()  # replaced as a whole, never mixed
    foreign = tmp_path / "docs"
    foreign.mkdir()
    (foreign / "notes.md").write_text("mine")
    with pytest.raises(publish.ConfigError, match="not made by this command"):
        publish.publish(foreign, outputs)
    assert (foreign / "notes.md").read_text() == "mine"


def test_publish_without_a_pipeline_run_says_what_to_run(tmp_path):
    with pytest.raises(publish.ConfigError, match="run the pipeline first"):
        publish.publish(tmp_path / "out", tmp_path / "empty")
