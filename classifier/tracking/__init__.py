"""The only code that talks to MLflow: the store, runs, lineage tags and the registry.

    store      where the store is, which experiment; MLflow errors as one line
    names      the metric names runs log, grouped by prefix for MLflow's UI
    runs       open, reopen and close runs; log metrics, artifacts and datasets
    lineage    tags tying a run to its git commit and DVC data
    registry   register model versions, move aliases, find what an alias points at
    monitoring monitoring runs of the served model, linked to its version
    parents    a sweep's parent run, and the records of trials that never opened one

Stages, tools and tests call these modules and never set a tracking URI themselves. The
package imports nothing by itself, so a stage depends only on the modules it uses.
"""
