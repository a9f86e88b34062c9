"""The import contract: what each side of the house may import, checked by importing it with the rest blocked.

One mechanism for both checks the project makes of its install: the deployer's modules import with every
training library unimportable (what ``pip install .`` gives), and the data and report modules with torch
and Lightning unimportable. ``scripts/check_floors.sh`` runs this file too, at the lowest versions claimed.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys

import pytest
from conftest import REPO

TRAINING = {"torch", "lightning", "torchvision", "torchmetrics"}
# packages from the bottom up: each may import only those before it (and fracture.progress)
LAYERS = ["imaging", "boxes", "scoring", "data", "deploy", "train", "report", "export"]
TORCH_SIDE = {"train", "export"}
# the predictor's install (pip install .): numpy, OpenCV, Pillow, onnxruntime, onnx only
DEPLOY = ["imaging.pixels", "imaging.budget", "imaging.contract", "imaging.preprocess", "imaging.dicom", "boxes.detection", "boxes.heatmap", "scoring.metrics", "scoring.froc",
          "scoring.selection", "scoring.folds", "data.labels", "data.synth", "data.duplicates", "deploy.predictor", "deploy.predict",
          "deploy.uploads", "deploy.serve", "deploy.calibrate", "deploy.release", "progress"]
# torch-free, with the data and report tools' pandas / matplotlib
DATA_AND_REPORT = ["data.annotations", "data.audit", "data.datasets", "scoring.localisation", "scoring.compare", "report.plots", "report.evaluate",
                   "report.markdown", "report.sources"]  # report: torch only inside evaluate --ckpt
ALLOWED_UP: dict[tuple[str, str], str] = {}  # none: report sits above train (evaluate --ckpt loads a checkpoint, lazily)


def modules() -> list[str]:
    root = REPO / "fracture"
    return sorted(".".join(p.relative_to(root).with_suffix("").parts) for p in root.rglob("*.py") if p.stem not in ("__init__", "__main__"))


def imported(module: str) -> set[str]:
    """The fracture modules ``module`` imports, at the top or inside a function."""
    tree = ast.parse((REPO / "fracture" / (module.replace(".", "/") + ".py")).read_text())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("fracture"):
            base = node.module.removeprefix("fracture").lstrip(".")
            out |= {f"{base}.{a.name}" if base in LAYERS else base for a in node.names} if base else {a.name for a in node.names}
        elif isinstance(node, ast.Import):
            out |= {a.name.removeprefix("fracture.") for a in node.names if a.name.startswith("fracture.")}
    return {m for m in out if m in modules() or m in LAYERS}


BLOCK = """
import importlib, sys
blocked = set(sys.argv[1].split(","))
class _Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in blocked:
            raise ImportError('blocked: ' + name)
sys.meta_path.insert(0, _Block())
for module in sys.argv[2:]:
    importlib.import_module('fracture.' + module)
"""


@pytest.mark.parametrize(("modules", "blocked"), [(DEPLOY, TRAINING | {"pandas", "matplotlib"}), (DATA_AND_REPORT, TRAINING)],
                         ids=["deploy without training libraries, pandas or matplotlib", "data and report without torch"])
def test_torch_free_modules_import_with_the_training_side_blocked(modules: list[str], blocked: set[str]) -> None:
    done = subprocess.run([sys.executable, "-c", BLOCK, ",".join(sorted(blocked)), *modules], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


def test_imports_point_down_the_layers_only() -> None:
    """No circles and no wrong-way edges between packages, lazy imports included."""
    wrong = []
    for module in modules():
        layer = module.split(".")[0]
        if layer not in LAYERS:  # the command entry points and fracture.progress
            continue
        for target in imported(module):
            other = target.split(".")[0]
            if other in LAYERS and LAYERS.index(other) > LAYERS.index(layer) and (module, target) not in ALLOWED_UP:
                wrong.append(f"{module} -> {target}")
    assert wrong == []


def test_every_module_is_in_a_layer_or_an_entry_point() -> None:
    entries = {m for m in modules() if "." not in m}
    assert entries == {"progress", "fit", "folds", "evaluate", "compare", "predict", "serve", "calibrate", "ensemble", "explain", "audit",
                       "datasets", "synth", "release"}
    for entry in entries - {"progress"}:  # thin: the command's code lives in its package
        assert len((REPO / "fracture" / f"{entry}.py").read_text().splitlines()) <= 10, entry
    assert set(DEPLOY + DATA_AND_REPORT) <= set(modules())
    assert {m for m in modules() if m.split(".")[0] in LAYERS and m.split(".")[0] not in TORCH_SIDE} == set(DEPLOY + DATA_AND_REPORT) - {"progress"}


def test_no_module_is_over_350_lines() -> None:
    sizes = {m: len((REPO / "fracture" / (m.replace(".", "/") + ".py")).read_text().splitlines()) for m in modules()}
    assert {m: n for m, n in sizes.items() if n > 350} == {}
