"""Sweeps: many trials of the pipeline, searched, run in parallel by DVC's queue workers.

spec.py reads the sweep spec; study.py keeps the record (an Optuna study in a file);
queue.py queues each trial as a DVC experiment and reads its results; resources.py shares
the cores and GPUs between workers; runner.py is the loop; report.py the HTML report;
promote.py sends the best trial through export's promotion gate. docs/sweeps.md.
"""
