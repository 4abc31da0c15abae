"""Keras 3 Vision Transformer trainer driven by a manifest CSV (filepath, label, optional split).

Model code uses keras.ops/keras.layers only, so KERAS_BACKEND=tensorflow, jax or torch all work.
"""
