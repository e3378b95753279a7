"""Shipping a model: deployable formats and their parity checks, and the promotion rule."""
