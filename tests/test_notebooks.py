"""The notebooks are stored without outputs (CI executes them: .ci/run, notebooks/run_notebooks.py)."""

from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


def test_notebooks_present():
    names = {p.name for p in NOTEBOOKS}
    expected = {"apt_mechanics.ipynb", "quickstart.ipynb", "custom_scorer.ipynb", "ablation_report.ipynb"}
    assert expected <= names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_valid_and_stripped(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    assert nb.metadata.kernelspec.name == "python3"
    for cell in nb.cells:
        if cell.cell_type == "code":
            stripped = not cell.outputs and cell.execution_count is None
            assert stripped, f"{path.name}: strip the outputs before committing"
