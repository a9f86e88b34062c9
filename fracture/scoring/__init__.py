"""Numbers with honest intervals: classification metrics and bootstrap, detection (FROC, AP), localisation, paired comparisons, folds. Torch-free."""
