"""The export stage: Keras model -> verified, versioned TensorFlow SavedModel that takes raw image bytes.

Modules: :mod:`export.savedmodel` (build the SavedModel), :mod:`export.warmup` (TensorFlow Serving warmup
records), :mod:`export.verify` (reload and compare with Keras), :mod:`export.publish` (versioned, atomic
publishing to a local or ``gs://`` base), :mod:`export.registry` (MLflow Model Registry) and
:mod:`export.api` (``export_run``: all of it for one MLflow training run). Import the module you need;
this package imports nothing heavy.
"""
