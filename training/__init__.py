"""tfloop training: datasets, models, training runs tracked in MLflow, and evaluation.

Modules (import them directly; this package imports nothing heavy):
``training.data`` (scan several roots, validate files, deterministic split, ``tf.data`` pipeline),
``training.demo_data`` (the procedurally drawn demo dataset), ``training.models`` (backbones, preprocessing
layer, ``build_model``/``load_model``), ``training.fit`` (``TrainConfig``, ``train`` -> ``TrainResult``),
``training.evaluate`` (metrics for Keras models or any predict
function), ``training.tracking`` (MLflow), ``training.plots`` (figures), ``training.accel`` (precision, XLA,
distribution strategy), ``training.distribute`` (``TF_CONFIG`` for an Indexed Job's pods, the non-chief
worker's tracker; ``python -m training.distribute`` is the pods' entrypoint).
"""
