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
# the predictor's install: numpy, OpenCV, onnxruntime, onnx, Pillow only
DEPLOY = ["preprocess", "labels", "progress", "metrics", "detection", "heatmap", "synth", "duplicates", "predict", "serve", "calibrate",
          "release", "folds"]
# torch-free, but with the data and report tools' pandas / matplotlib
DATA_AND_REPORT = ["annotations", "audit", "datasets", "localisation", "compare", "plots", "evaluate"]
TORCH_SIDE = {"augment", "data", "model", "networks", "recipe", "losses", "module", "fit", "checkpoint", "runio", "ensemble", "explain",
              "graph", "quantize", "export"}

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


def test_no_torch_free_module_names_a_torch_side_module_even_inside_a_function() -> None:
    """Lazy imports too: a torch-free module reaches the training side only through a command line (--ckpt paths
    of evaluate), never by importing it; the exceptions are listed with their reason."""
    allowed = {("evaluate", "checkpoint"), ("evaluate", "explain")}  # evaluate --ckpt: scores a checkpoint, torch then required
    found = []
    for name in DEPLOY + DATA_AND_REPORT:
        tree = ast.parse((REPO / "fracture" / f"{name}.py").read_text())
        for node in ast.walk(tree):
            targets = []
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("fracture"):
                targets = [a.name for a in node.names] if node.module == "fracture" else [node.module.split(".")[1]]
            elif isinstance(node, ast.Import):
                targets = [a.name.split(".")[1] for a in node.names if a.name.startswith("fracture.")]
            found += [(name, t) for t in targets if t in TORCH_SIDE and (name, t) not in allowed]
    assert found == []


def test_every_module_is_on_one_side() -> None:
    modules = {p.stem for p in (REPO / "fracture").glob("*.py")} - {"__init__"}
    assert modules == set(DEPLOY) | set(DATA_AND_REPORT) | TORCH_SIDE
