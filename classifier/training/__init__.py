"""Fitting a model: the epoch loop, its callbacks, precision, augmentation, checkpoints."""
