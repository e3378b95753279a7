"""The file MLflow runs to build the registered model ("models from code", no pickle).

``classifier.tracking.registry.log_served_model`` logs this file with the project modules it
imports; loading the model runs it, and MLflow then calls ``load_context`` with the Keras
file, the labels and the resize policy. See classifier/serving/pyfunc.py for what the
model takes and returns.
"""

from mlflow.models import set_model

from classifier.serving.pyfunc import ImageClassifier

set_model(ImageClassifier())
