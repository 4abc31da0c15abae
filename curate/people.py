"""Is there a person in the photo? Two small pretrained detectors from Google's MediaPipe, run offline.

Flower folders collect portraits, parade bands, riders and protests, and the model trained on the folder
labels learns them as part of the class. OpenCV's Haar cascade finds only large frontal faces. Two
detectors trained on people do better and need no download:
- BlazeFace, full range (`face_detection_full_range_sparse.tflite`, 192 x 192 input): faces down to a
  few percent of the frame, in profile too.
- BlazePose's person detector (`pose_detection.tflite`, 224 x 224 input): a person's upper body, seen
  from a distance or cropped.

Both files are copied unchanged from the `mediapipe==0.10.21` wheel on PyPI (Apache-2.0, its licence in
curate/models/LICENSE; their provenance and checksums in curate/models/README.md). MediaPipe itself is
not a dependency: the releases that bundle these models pin numpy<2 and protobuf<5, and later releases
download their models at run time. The models run in LiteRT (`ai_edge_litert`, TensorFlow Lite's
runtime; TensorFlow's own `tf.lite.Interpreter` when LiteRT is missing, same scores). Each gives a score
per anchor; the photo's score is the highest one (sigmoid of the clipped logit, as MediaPipe's decoder
computes it). Boxes are not decoded: the scene measures only ask whether someone is there.

Without either interpreter `available()` is False and the scores are not measured (logged by curate.scene).
"""

from __future__ import annotations

import functools
import threading
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

MODELS_DIR = Path(__file__).parent / "models"
# name -> (model file, input side in pixels)
DETECTORS = {"face_score": ("face_detection_full_range_sparse.tflite", 192),
             "body_score": ("pose_detection.tflite", 224)}
_local = threading.local()


def interpreter_class():
    """LiteRT's TFLite interpreter class, else TensorFlow's, else None."""
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        try:
            import tensorflow as tf
        except ImportError:
            return None
        Interpreter = getattr(tf.lite, "Interpreter", None)  # noqa: N806 (a class)
    return Interpreter


@functools.cache
def available() -> bool:
    """True when a TFLite interpreter and both model files are at hand."""
    return interpreter_class() is not None and all((MODELS_DIR / f).is_file() for f, _ in DETECTORS.values())


def _interpreters() -> dict:
    """name -> (interpreter, input tensor index, logits tensor index), one interpreter per model and
    thread: an interpreter holds its tensors and is not thread-safe."""
    if not hasattr(_local, "models"):
        interpreter = interpreter_class()
        models = {}
        with warnings.catch_warnings():  # TF's fallback announces its move to LiteRT on every load
            warnings.simplefilter("ignore")
            for name, (file, _) in DETECTORS.items():
                it = interpreter(model_path=str(MODELS_DIR / file), num_threads=1)
                it.allocate_tensors()
                # outputs: box regressors (1, anchors, coords) and one logit per anchor (1, anchors, 1)
                logits = next(d["index"] for d in it.get_output_details() if d["shape"][-1] == 1)
                models[name] = (it, it.get_input_details()[0]["index"], logits)
        _local.models = models
    return _local.models


def load_quietly() -> None:
    """Load this thread's detectors with the process's stderr silenced: the first TFLite interpreter in a
    process writes "INFO: Created TensorFlow Lite XNNPACK delegate for CPU." there, from native code that
    neither logging nor TF_CPP_MIN_LOG_LEVEL reaches, and `curate -q` promises an empty stderr on success.
    Call it before other threads start writing (curate.scene.measure does, before its thread pool)."""
    from curate.io import native_stderr_silenced

    with native_stderr_silenced():
        _interpreters()


def letterbox(image: np.ndarray, side: int) -> np.ndarray:
    """`image` (H x W x 3 RGB, uint8) scaled to fit a `side` x `side` square, centred on black, in
    [-1, 1]: the input MediaPipe's detectors were trained with (aspect kept, padded)."""
    h, w = image.shape[:2]
    scale = side / max(h, w)
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    small = np.asarray(Image.fromarray(image).resize((nw, nh), Image.BILINEAR), dtype=np.float32)
    square = np.full((side, side, 3), -1.0, dtype=np.float32)
    top, left = (side - nh) // 2, (side - nw) // 2
    square[top:top + nh, left:left + nw] = small / 127.5 - 1.0
    return square


def person_scores(image: np.ndarray) -> dict[str, float]:
    """face_score and body_score (0..1): the most confident face (BlazeFace) and person (BlazePose
    detector) anywhere in `image` (H x W x 3 RGB, uint8). Callers check `available()` first."""
    out = {}
    for name, (it, input_index, logits_index) in _interpreters().items():
        it.set_tensor(input_index, letterbox(image, DETECTORS[name][1])[None])
        it.invoke()
        logit = np.clip(it.get_tensor(logits_index).max(), -100.0, 100.0)
        out[name] = float(1.0 / (1.0 + np.exp(-logit)))
    return out
