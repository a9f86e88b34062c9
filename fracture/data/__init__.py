"""Datasets in the standard layout: labels and columns, annotations and splits, duplicates, audit, importers, synthetic radiographs. Torch-free (pandas)."""
