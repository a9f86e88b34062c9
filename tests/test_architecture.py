"""The import contract: what each side of the house may import, checked by importing it with the rest blocked.

One mechanism for both checks the project makes of its install: the deployer's modules import with every
training library unimportable (what ``pip install .`` gives), and the data and report modules with torch
and Lightning unimportable. ``scripts/check_floors.sh`` runs this file too, at the lowest versions claimed.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys

import pytest
from conftest import REPO

TRAINING = {"torch", "lightning", "torchvision", "torchmetrics"}
# packages from the bottom up: each may import only those before it (and fracture.progress / fracture.machine)
LAYERS = ["imaging", "boxes", "scoring", "data", "deploy", "train", "report", "export"]
TORCH_SIDE = {"train", "export"}
# the predictor's install (pip install .): numpy, OpenCV, Pillow, onnxruntime, onnx only
DEPLOY_CORE = ["deploy.metadata", "deploy.predictor", "deploy.predict", "deploy.calibrate", "deploy.release"]
ROOMS = {"serve": ["deploy.serve.app", "deploy.serve.uploads", "deploy.serve.connections"],
         "pacs": ["deploy.pacs.node", "deploy.pacs.results", "deploy.pacs.source", "deploy.pacs.spool", "deploy.pacs.sender", "deploy.pacs.pdu"]}
DOORS = {("deploy.predict", "deploy.pacs.results")}  # the CLI's --dicom-out writes the node's answers from files: a front door may use a room
DEPLOY = ["imaging.pixels", "imaging.budget", "imaging.contract", "imaging.preprocess", "imaging.dicom", "boxes.detection", "boxes.heatmap", "scoring.metrics",
          "scoring.calibration", "scoring.froc", "scoring.selection", "scoring.folds", "data.labels", "data.inputs", "data.synth", "data.duplicates",
          *DEPLOY_CORE, *ROOMS["serve"], *ROOMS["pacs"], "progress", "machine"]
# torch-free, with the data and report tools' pandas / matplotlib
DATA_AND_REPORT = ["data.annotations", "data.audit", "data.datasets", "scoring.localisation", "scoring.compare", "report.plots", "report.evaluate",
                   "report.markdown", "report.sources"]  # report: torch only inside evaluate --ckpt
ALLOWED_UP: dict[tuple[str, str], str] = {}  # none: report sits above train (evaluate --ckpt loads a checkpoint, lazily)


def modules() -> list[str]:
    root = REPO / "fracture"
    return sorted(".".join(p.relative_to(root).with_suffix("").parts) for p in root.rglob("*.py") if p.stem not in ("__init__", "__main__"))


def _absolute(module: str, node: ast.ImportFrom) -> str:
    """The absolute module an ``ImportFrom`` names, relative imports (``from ..deploy import serve``) resolved."""
    if not node.level:
        return node.module or ""
    package = ("fracture." + module).split(".")[: -node.level]
    return ".".join(package + ([node.module] if node.module else []))


def imported(module: str) -> set[str]:
    """The fracture modules ``module`` imports: at the top or inside a function, absolute or relative, and by
    ``importlib.import_module("fracture....")`` or ``__import__("fracture....")`` with a literal name."""
    tree = ast.parse((REPO / "fracture" / (module.replace(".", "/") + ".py")).read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = _absolute(module, node)
            if base == "fracture" or base.startswith("fracture."):
                names |= {f"{base}.{a.name}" for a in node.names} | {base}
        elif isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
            if called in ("import_module", "__import__"):
                names.add(node.args[0].value)
    known = set(modules()) | set(LAYERS)
    return {m for m in (n.removeprefix("fracture.") for n in names if n.startswith("fracture.")) if m in known}


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
    assert entries == {"progress", "machine", "fit", "folds", "evaluate", "compare", "predict", "serve", "calibrate", "ensemble", "explain", "audit",
                       "datasets", "synth", "release", "node"}
    for entry in entries - {"progress", "machine"}:  # thin: the command's code lives in its package
        assert len((REPO / "fracture" / f"{entry}.py").read_text().splitlines()) <= 10, entry
    assert set(DEPLOY + DATA_AND_REPORT) <= set(modules())
    assert {m for m in modules() if m.split(".")[0] in LAYERS and m.split(".")[0] not in TORCH_SIDE} == set(DEPLOY + DATA_AND_REPORT) - {"progress", "machine"}


def room_of(module: str) -> str | None:
    """``serve``, ``pacs``, ``core`` for the deploy floor's modules; None elsewhere."""
    parts = module.split(".")
    if parts[0] != "deploy":
        return None
    return parts[1] if len(parts) > 2 else "core"


def test_the_deploy_rooms_import_the_core_and_never_each_other() -> None:
    """serve/ and pacs/ sit on the deploy core (predictor, metadata, ...); neither imports the other, and the core
    imports no room (the CLI's --dicom-out is the one named door)."""
    assert {m for m in modules() if room_of(m)} == set(DEPLOY_CORE) | set(ROOMS["serve"]) | set(ROOMS["pacs"])
    wrong = []
    for module in modules():
        mine = room_of(module)
        for target in imported(module):
            theirs = room_of(target)
            if mine and theirs and mine != theirs and theirs != "core" and (module, target) not in DOORS:
                wrong.append(f"{module} -> {target}")
    assert wrong == []


def room_counts() -> dict[str, object]:
    """What docs/architecture.md states about the rooms, computed from the import graph."""
    between = sum(1 for m in modules() if room_of(m) for t in imported(m) if room_of(t) and room_of(t) != room_of(m))
    sizes = {m: len((REPO / "fracture" / (m.replace(".", "/") + ".py")).read_text().splitlines()) for m in modules()}
    largest = max(sizes, key=sizes.get)
    return {"core": len(DEPLOY_CORE), "serve": len(ROOMS["serve"]), "pacs": len(ROOMS["pacs"]), "between": between,
            "largest": largest, "largest_lines": sizes[largest]}


def test_the_architecture_page_states_the_rooms_as_they_are() -> None:
    """The counts on docs/architecture.md come from this test's own graph, so they cannot go stale."""
    text = (REPO / "docs" / "architecture.md").read_text()
    stated = re.search(r"deploy floor: core (\d+) modules, serve (\d+), pacs (\d+); (\d+) imports from one room into another "
                       r"\(the core included\); the largest module `([\w.]+)` \((\d+) lines\)", text)
    assert stated, "docs/architecture.md states the deploy floor's rooms in the sentence this test reads"
    got = room_counts()
    assert (int(stated[1]), int(stated[2]), int(stated[3]), int(stated[4]), stated[5], int(stated[6])) == (
        got["core"], got["serve"], got["pacs"], got["between"], got["largest"], got["largest_lines"]), got


def test_no_module_is_over_350_lines() -> None:
    sizes = {m: len((REPO / "fracture" / (m.replace(".", "/") + ".py")).read_text().splitlines()) for m in modules()}
    assert {m: n for m, n in sizes.items() if n > 350} == {}


def test_the_import_contract_sees_relative_and_dynamic_imports(tmp_path) -> None:
    """What the checker reads: a relative import up a layer and a literal import_module are both edges."""
    tree = ast.parse("from ..deploy import predict\nfrom . import froc\nimport importlib\nimportlib.import_module('fracture.train.fit')\n"
                     "__import__('fracture.export.graph')\n")
    found = {_absolute("scoring.metrics", n) for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert found == {"fracture.deploy", "fracture.scoring"}
    probe = REPO / "fracture" / "scoring" / "_probe_contract.py"
    probe.write_text("from ..deploy import predict\nimport importlib\nimportlib.import_module('fracture.train.fit')\n")
    try:
        assert {"deploy.predict", "train.fit"} <= imported("scoring._probe_contract")
    finally:
        probe.unlink()


def test_no_module_imports_itself_back() -> None:
    """No circles between modules, lazy imports included (imaging.dicom and imaging.preprocess had one)."""
    graph = {m: {t for t in imported(m) if t in modules() and t != m} for m in modules()}
    seen, on_path, circles = set(), [], []

    def visit(m: str) -> None:
        if m in on_path:
            circles.append(on_path[on_path.index(m):] + [m])
            return
        if m in seen:
            return
        seen.add(m)
        on_path.append(m)
        for t in sorted(graph[m]):
            visit(t)
        on_path.pop()

    for m in sorted(graph):
        visit(m)
    assert circles == []


GATE = {"imaging.preprocess", "imaging.dicom"}  # the one gate: every other module reads image bytes through it
DECODERS = {"imdecode", "imread", "imreadmulti", "imdecodemulti", "dcmread", "pixel_array", "read_file"}


def test_image_bytes_are_decoded_by_the_gate_only() -> None:
    """No module but the gate calls a decoder (OpenCV, pydicom, Pillow's Image.open) or reads DICOM pixels."""
    found = []
    for module in modules():
        if module in GATE:
            continue
        for node in ast.walk(ast.parse((REPO / "fracture" / (module.replace(".", "/") + ".py")).read_text())):
            if isinstance(node, ast.Attribute) and (node.attr in DECODERS or (node.attr == "open" and isinstance(node.value, ast.Name)
                                                                              and node.value.id == "Image")):
                found.append(f"{module}: {node.attr}")
            elif isinstance(node, ast.ImportFrom) and node.module in ("PIL", "PIL.Image", "pydicom", "pydicom.pixels"):
                found.append(f"{module}: from {node.module} import …")
    assert found == []


def test_the_model_files_metadata_has_one_reader_and_one_writer() -> None:
    """Only deploy.metadata touches an ONNX file's metadata entries: every other module goes through ModelMetadata."""
    found = []
    for module in modules():
        if module == "deploy.metadata":
            continue
        for node in ast.walk(ast.parse((REPO / "fracture" / (module.replace(".", "/") + ".py")).read_text())):
            if isinstance(node, ast.Attribute) and node.attr in ("metadata_props", "custom_metadata_map", "get_modelmeta"):
                found.append(f"{module}: {node.attr}")
    assert found == []
