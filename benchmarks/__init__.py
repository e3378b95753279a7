"""Benchmarks, run by hand or by `make bench`; every figure is a ratio against a baseline run
side by side in the same invocation, because these machines are shared and noisy."""
