"""Repository hygiene that CI enforces."""
import json

from cdlib import paths


def test_notebooks_in_git_are_stripped_of_outputs():
    notebooks = sorted(paths.NOTEBOOKS.glob("*.ipynb"))
    assert notebooks, "no notebooks found"
    for nb in notebooks:
        cells = json.loads(nb.read_text())["cells"]
        dirty = [i for i, c in enumerate(cells) if c["cell_type"] == "code" and (c["outputs"] or c["execution_count"])]
        assert not dirty, f"{nb.name}: cells {dirty} hold outputs; run `make strip`"


def test_every_notebook_has_a_parameters_cell():
    for nb in sorted(paths.NOTEBOOKS.glob("*.ipynb")):
        cells = json.loads(nb.read_text())["cells"]
        tagged = [c for c in cells if "parameters" in c.get("metadata", {}).get("tags", [])]
        assert len(tagged) == 1, f"{nb.name}: needs exactly one cell tagged 'parameters' for papermill"
        assert "profile" in "".join(tagged[0]["source"])
