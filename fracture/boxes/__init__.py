"""Fracture boxes and maps on images: box text and geometry, map to boxes, heatmaps and overlays. Torch-free."""
