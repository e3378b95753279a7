"""Scoring a model on held-out images: metrics, calibration, pictures, run comparisons."""
