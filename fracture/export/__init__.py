"""Checkpoint to one checked ONNX file: the graph, INT8 quantisation, the export command (python -m fracture.export)."""
