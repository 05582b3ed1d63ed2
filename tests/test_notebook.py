"""notebooks/end_to_end.ipynb runs top to bottom on a CPU without the network (needs the `notebook` extra:
nbclient, nbformat, ipykernel, matplotlib), draws its packing picture and its training loss falls."""

from __future__ import annotations

import base64
import io
import re
from pathlib import Path

import pytest

nbclient = pytest.importorskip("nbclient")
nbformat = pytest.importorskip("nbformat")
pytest.importorskip("ipykernel")
pytest.importorskip("matplotlib")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "end_to_end.ipynb"


def cell_outputs(notebook, marker: str) -> list:
    (cell,) = [c for c in notebook.cells if c.cell_type == "code" and marker in c.source]
    return cell.outputs


def png_images(outputs: list) -> list:
    from PIL import Image

    images = []
    for output in outputs:
        data = output.get("data", {})
        if "image/png" in data:
            images.append(Image.open(io.BytesIO(base64.b64decode(data["image/png"]))))
    return images


def stdout(outputs: list) -> str:
    return "".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream" and o.get("name") == "stdout")


def test_end_to_end_notebook_runs_offline_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.setenv(name, "1")  # the kernel inherits these: nothing may come from the network
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    assert not any(c.get("outputs") for c in notebook.cells if c.cell_type == "code"), "ship the notebook clean"
    client = nbclient.NotebookClient(
        notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOK.parent)}}
    )
    client.execute()  # raises CellExecutionError, naming the cell, if any cell fails

    (packing,) = png_images(cell_outputs(notebook, "show(draw_row("))
    assert packing.width > 800 and packing.height > 300
    assert len(packing.getcolors(maxcolors=1 << 16) or range(1 << 16)) > 20  # a drawing, not a blank image
    assert png_images(cell_outputs(notebook, "SyntheticSource.from_config")), "the sample images are drawn"
    training = stdout(cell_outputs(notebook, "losses = train("))
    first, last = map(float, re.search(r"loss ([\d.]+) -> ([\d.]+)", training).groups())
    assert last < first - 2.0, training
    assert png_images(cell_outputs(notebook, "losses = train(")), "the loss curve is drawn"
    assert "tokens/s" in stdout(cell_outputs(notebook, "step_time(model, timing_batch)"))
