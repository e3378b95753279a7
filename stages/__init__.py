"""The pipeline's five stages, one module each, run by DVC as ``python -m stages.<name>``.

download -> preprocess -> train -> evaluate -> export; see dvc.yaml for the graph. Each
module is thin: it parses paths, loads params and calls the ``classifier`` library.
"""

# The library sets TensorFlow's log level; it must run before a module here imports Keras.
import classifier  # noqa: F401
from classifier.cli import pause_collector_while_starting

pause_collector_while_starting()
