"""Training with PyTorch Lightning: networks, losses, recipe, augmentation, the data module, the LightningModule, fit, checkpoints, ensembles, Grad-CAM."""
