"""The pipeline's stages, one module each, run by DVC as ``python -m stages.<name>``.

download -> preprocess -> train -> evaluate -> export; see dvc.yaml for the graph.
"""

import os

# Keep TensorFlow's C++ start-up chatter (INFO and WARNING) out of the pipeline's output.
# It must be set before TensorFlow is first imported, which any stage module may do.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
