"""Evaluation reports: metrics with intervals, subgroups and plots from a checkpoint or an ONNX file. Torch only for --ckpt."""
