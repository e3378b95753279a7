"""The file MLflow runs to build the registered model ("models from code", no pickle).

``tracking.register_model`` logs this file with the ``stages`` package beside it; loading
the model runs it, and MLflow then calls ``load_context`` with the Keras file, the labels
and the resize policy. See stages/serving.py for what the model takes and returns.
"""

from mlflow.models import set_model

from stages.serving import ImageClassifier

set_model(ImageClassifier())
