"""The networks (pure Keras 3, so they also run on JAX) and loading model files safely."""
