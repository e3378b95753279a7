"""The library behind the pipeline: everything the stages, tools and tests share.

data/        fetching, archives, IDX files, decoding images, splits, the data report
model/       the architectures (pure Keras 3) and loading model files safely
training/    the training loop, its callbacks, precision, augmentation, checkpoints
evaluation/  test metrics, calibration, plots, comparing two runs
tracking/    the one place that talks to MLflow: store, runs, lineage, registry
export/      exported formats and their parity, the promotion rule
serving/     the registered model: images as people have them in, class names out
"""

from classifier.quiet import quiet_library_noise

# Keep TensorFlow's start-up lines and MLflow's progress bars out of the pipeline's output
# (classifier/quiet.py). It must run before TensorFlow or MLflow is first imported, which
# any module here may do.
quiet_library_noise()
