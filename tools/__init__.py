"""Entry points people run beside the pipeline: ``python -m tools.<name>``.

compare (two runs side by side), predict (classify image files), summary (the block `make run`
ends with), team_up (try team mode).
"""

# The library sets TensorFlow's log level; it must run before a module here imports Keras.
import classifier  # noqa: F401
