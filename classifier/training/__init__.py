"""Fitting a model: the epoch loop, its callbacks, precision, augmentation, checkpoints;
and a sweep trial's share of the machine (trial.py)."""
