"""Fit, evaluate and predict: `curate train` / `curate predict`, and an array-level API for K-fold use.

Array API (images are uint8 (N, S, S, 3) as returned by `train.data.load_images`, labels are int class
indices into the sorted class names):
    fit_arrays(x_train, y_train, x_val, y_val, preset, seed, epochs=None, progress=False) -> keras.Model
        (weights of the best validation epoch; without validation data, the last epoch)
    predict_arrays(model, x) -> (probabilities (N, classes) float32, class-token embeddings (N, width) float32)

`train(manifest, data, out, ...)` writes to `out`: manifest.csv (with `split`), model.keras (best
validation epoch), classes.json, log.csv, history.png, metrics.json, predictions.csv (test split).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import os
import platform
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from curate.io import (
    IMAGE_EXTENSIONS,
    CurateError,
    atomic_path,
    atomic_write_csv,
    atomic_write_json,
    read_json,
    read_manifest,
    run_lock,
)
from train import data as tdata
from train.presets import Preset, get_preset

if TYPE_CHECKING:  # keras is imported where used (`_keras`): importing it takes seconds
    import keras

log = logging.getLogger("curate.train")


def _keras():
    import train.model  # noqa: F401 -- registers the custom layers for load_model
    from train.backend import keras

    return keras


# ---------------------------------------------------------------- callbacks


def _callbacks_module():
    keras = _keras()

    class EpochInfo(keras.callbacks.Callback):
        """Adds `lr` and `seconds` to each epoch's logs (so CSVLogger and History record them)."""

        def on_epoch_begin(self, epoch, logs=None):
            self._t0 = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            if logs is None:
                return
            lr = self.model.optimizer.learning_rate
            logs["lr"] = float(keras.ops.convert_to_numpy(lr))
            logs["seconds"] = round(time.perf_counter() - self._t0, 3)

    class KeepBest(keras.callbacks.Callback):
        """Remember the weights of the best epoch by `monitor` and restore them when training ends."""

        def __init__(self, monitor: str):
            super().__init__()
            self.monitor = monitor
            self.mode_max = "acc" in monitor
            self.best = None
            self.best_epoch = -1
            self.weights = None

        def on_epoch_end(self, epoch, logs=None):
            value = (logs or {}).get(self.monitor)
            if value is None:
                return
            if self.best is None or (value > self.best if self.mode_max else value < self.best):
                self.best, self.best_epoch, self.weights = value, epoch, self.model.get_weights()

        def on_train_end(self, logs=None):
            if self.weights is not None:
                self.model.set_weights(self.weights)

    return EpochInfo, KeepBest


# ---------------------------------------------------------------- array API


def _optimizer(p: Preset, steps_per_epoch: int, epochs: int):
    keras = _keras()
    if p.schedule == "cosine":
        total = max(1, steps_per_epoch * epochs)
        warmup = min(total - 1, steps_per_epoch * p.warmup_epochs)
        lr = keras.optimizers.schedules.CosineDecay(
            initial_learning_rate=0.0 if warmup else p.learning_rate, decay_steps=max(1, total - warmup),
            warmup_target=p.learning_rate if warmup else None, warmup_steps=warmup)
    else:
        lr = p.learning_rate
    clip = {"clipvalue": p.clipvalue} if p.clipvalue is not None else {"clipnorm": p.clipnorm} if p.clipnorm else {}
    if p.optimizer == "adam":
        return keras.optimizers.Adam(lr, **clip)
    opt = keras.optimizers.AdamW(lr, weight_decay=p.weight_decay, **clip)
    # No decay on biases, norms, the class token or position embeddings (standard for ViTs).
    opt.exclude_from_weight_decay(var_names=["bias", "gamma", "beta", "token", "position"])
    return opt


def compile_model(model: keras.Model, p: Preset, steps_per_epoch: int, epochs: int,
                  steps_per_execution: int = 8) -> keras.Model:
    """Compile with the preset's optimiser, schedule, loss (label smoothing), an `acc` metric and run_eagerly.

    steps_per_execution runs several train steps per compiled call, so Python's per-step overhead does not
    throttle small models (same updates, same schedule; batch-level callbacks just fire less often).
    """
    keras = _keras()
    model.compile(optimizer=_optimizer(p, steps_per_epoch, epochs),
                  loss=keras.losses.CategoricalCrossentropy(label_smoothing=p.label_smoothing),
                  metrics=[keras.metrics.CategoricalAccuracy(name="acc")],
                  steps_per_execution=max(1, min(steps_per_execution, steps_per_epoch)), run_eagerly=p.run_eagerly)
    return model


def fit_arrays(x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray | None = None,
               y_val: np.ndarray | None = None, preset: str | Preset = "cpu", seed: int = 0,
               epochs: int | None = None, progress: bool = False, num_classes: int | None = None,
               callbacks: list | None = None) -> keras.Model:
    """Train a fresh ViT of `preset` on uint8 images and int labels; return it with the best-val weights.

    x_*: uint8 (N, S, S, 3) with S = the preset's image_size; y_*: int class indices. `num_classes`
    defaults to 1 + the largest label seen. The best epoch is chosen by the preset's checkpoint monitor
    (val_acc, or val_loss for `seed`); without validation data the last epoch is kept. The History is on
    `model.history_` (a dict of per-epoch lists) and the kept epoch (0-based) on `model.best_epoch_`.
    """
    keras = _keras()
    from train.model import build_vit

    p = get_preset(preset).with_epochs(epochs)
    size = p.model.image_size
    if x_train.shape[1:] != (size, size, 3):
        raise CurateError(f"images are {x_train.shape[1:]}, preset {p.name} needs ({size}, {size}, 3)")
    y_train = np.asarray(y_train, dtype=np.int64)
    has_val = x_val is not None and y_val is not None and len(x_val) > 0
    n_cls = num_classes or int(max(y_train.max(), np.max(y_val) if has_val else 0)) + 1

    keras.utils.set_random_seed(seed)
    model = build_vit(p.model, n_cls, seed=seed)
    steps = math.ceil(len(x_train) / p.batch_size)
    compile_model(model, p, steps, p.epochs)
    EpochInfo, KeepBest = _callbacks_module()
    # Without validation data there is nothing honest to select on: keep the last epoch.
    keep = KeepBest(p.checkpoint_monitor) if has_val else None
    cbs = [EpochInfo()] + ([keep] if keep else [])
    if p.schedule == "plateau":
        monitor = "val_loss" if has_val else "loss"
        cbs.append(keras.callbacks.ReduceLROnPlateau(monitor=monitor, factor=p.plateau_factor,
                                                     patience=p.plateau_patience, min_lr=p.plateau_min_lr,
                                                     verbose=int(progress)))
    if p.early_stopping_patience is not None:
        cbs.append(keras.callbacks.EarlyStopping(monitor="val_loss" if has_val else "loss",
                                                 patience=p.early_stopping_patience, restore_best_weights=False))
    cbs += list(callbacks or [])
    val = (x_val, keras.utils.to_categorical(np.asarray(y_val), n_cls)) if has_val else None
    verbose = (1 if sys.stderr.isatty() else 2) if progress else 0
    # Keras prints its progress on stdout; curate keeps stdout for results (`predict` lines, paths)
    with contextlib.redirect_stdout(sys.stderr):
        hist = model.fit(x_train, keras.utils.to_categorical(y_train, n_cls), batch_size=p.batch_size,
                         epochs=p.epochs, validation_data=val, shuffle=True, callbacks=cbs, verbose=verbose)
    model.history_ = dict(hist.history)
    model.best_epoch_ = keep.best_epoch if keep and keep.best_epoch >= 0 else len(model.history_["loss"]) - 1
    return model


def predict_arrays(model: keras.Model, x: np.ndarray, batch_size: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """(class probabilities (N, classes), class-token embeddings (N, width)) of uint8 images `x`."""
    from train.model import embedding_model

    probs, emb = embedding_model(model).predict(x, batch_size=batch_size, verbose=0)
    return np.asarray(probs, dtype=np.float32), np.asarray(emb, dtype=np.float32)


# ---------------------------------------------------------------- curate train


def _device() -> str:
    keras = _keras()
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        gpus = tf.config.list_logical_devices("GPU")
        if gpus:
            return ", ".join(d.name for d in gpus)
    elif backend == "jax":
        import jax

        return str(jax.devices()[0])
    elif backend == "torch":
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    return f"CPU ({os.cpu_count()} cores, {platform.processor() or platform.machine()})"


def plot_history(history: dict, path: Path, title: str = "") -> None:
    """Loss and accuracy per epoch, train vs validation (like the original post's plots)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, name in ((axes[0], "loss", "loss"), (axes[1], "acc", "accuracy")):
        epochs = range(1, len(history.get(key, [])) + 1)
        ax.plot(epochs, history.get(key, []), label=f"train {name}")
        if f"val_{key}" in history:
            ax.plot(epochs, history[f"val_{key}"], label=f"validation {name}")
        ax.set_xlabel("epoch")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def _prepare(manifest: str | os.PathLike, data: str | os.PathLike, limit: int | None, seed: int) -> pd.DataFrame:
    if not Path(data).is_dir():
        raise CurateError(f"{data}: data folder not found")
    df = read_manifest(manifest)
    df = tdata.check_manifest(df, data, name=str(manifest))
    if limit:
        df = tdata.check_manifest(tdata.stratified_sample(df, limit, seed=seed), data, name=f"{manifest} (--limit)")
    return tdata.assign_splits(df, seed=0)


def train(manifest: str | os.PathLike, data: str | os.PathLike, out: str | os.PathLike, preset: str = "cpu",
          epochs: int | None = None, seed: int = 0, limit: int | None = None, progress: bool = True) -> dict:
    """Train a ViT on `manifest` (filepath, label, optional split; paths relative to `data`); write to `out`.

    The split is a deterministic stratified 80/10/10 (split seed 0, independent of the training `seed`, so
    every seed is scored on the same test photos); an existing `split` column is respected and rows whose
    split is not train/val/test are ignored. Returns the metrics written to metrics.json.
    """
    p = get_preset(preset).with_epochs(epochs)
    out = Path(out)
    df = _prepare(manifest, data, limit, seed)
    with run_lock(out, "train"):
        t_start = time.perf_counter()
        classes = tdata.class_names(df)
        images, ok = tdata.load_images(df, data, p.model.image_size, progress=progress)
        t_loaded = time.perf_counter()
        skipped = df.loc[~ok, "filepath"].tolist()
        df_ok = df[ok].reset_index(drop=True)
        images = images[ok]
        written = df.copy()
        written["skipped"] = ~ok
        atomic_write_csv(out / "manifest.csv", written)
        tdata.check_manifest(df_ok, data, name=f"{manifest} (readable images)")
        y = df_ok["label"].map({c: i for i, c in enumerate(classes)}).to_numpy()
        idx = {s: np.flatnonzero(df_ok["split"].to_numpy() == s) for s in tdata.SPLITS}
        if len(idx["train"]) == 0:
            raise CurateError(f"{manifest}: no training rows after splitting")
        never = tdata.classes_never_trained(df_ok)
        if never:
            log.warning("%s: no training photo of %s (all in val/test): the model cannot learn %s", manifest,
                        ", ".join(never), "it" if len(never) == 1 else "them")
        keras = _keras()
        # said here because TensorFlow's own device notices are held back (train/backend.py)
        log.info("training %s on %d images (%d val, %d test), %d classes; %d unreadable skipped; on %s",
                 p.name, len(idx["train"]), len(idx["val"]), len(idx["test"]), len(classes), len(skipped), _device())
        ckpt = out / ".checkpoint.keras"
        monitor = p.checkpoint_monitor if len(idx["val"]) else p.checkpoint_monitor.removeprefix("val_")
        callbacks = [
            keras.callbacks.ModelCheckpoint(str(ckpt), monitor=monitor, mode="max" if "acc" in monitor else "min",
                                            save_best_only=True, verbose=0),
            keras.callbacks.CSVLogger(str(out / "log.csv")),
        ]
        t_fit = time.perf_counter()
        model = fit_arrays(images[idx["train"]], y[idx["train"]], images[idx["val"]], y[idx["val"]], p, seed=seed,
                           progress=progress, num_classes=len(classes), callbacks=callbacks)
        fit_seconds = time.perf_counter() - t_fit
        if ckpt.exists():
            os.replace(ckpt, out / "model.keras")
        else:
            model.save(out / "model.keras")
        atomic_write_json(out / "classes.json", {"classes": classes, "image_size": p.model.image_size})

        history = model.history_
        plot_history(history, out / "history.png", title=f"ViT preset {p.name}, seed {seed}")
        test = idx["test"] if len(idx["test"]) else idx["val"]
        probs, _ = predict_arrays(model, images[test])
        pred = probs.argmax(1)
        preds = pd.DataFrame({"filepath": df_ok["filepath"].to_numpy()[test], "label": df_ok["label"].to_numpy()[test],
                              "predicted": [classes[i] for i in pred]})
        for j, c in enumerate(classes):
            preds[f"p_{c}"] = probs[:, j].round(6)
        atomic_write_csv(out / "predictions.csv", preds)

        epoch_seconds = history.get("seconds", [])
        steady = epoch_seconds[1:] if len(epoch_seconds) > 1 else epoch_seconds
        metrics = {
            "preset": p.name, "seed": seed, "manifest": str(manifest), "data": str(Path(data).resolve()),
            "classes": classes, "n_train": int(len(idx["train"])), "n_val": int(len(idx["val"])),
            "n_test": int(len(idx["test"])), "evaluated_on": "test" if len(idx["test"]) else "val",
            "skipped_unreadable": skipped,
            **_classification_metrics(y[test], pred, classes),
            "params": int(model.count_params()), "epochs_run": len(history.get("loss", [])),
            "best_epoch": int(model.best_epoch_) + 1,
            "images_per_second": round(len(idx["train"]) / float(np.median(steady)), 1) if steady else None,
            "load_seconds": round(t_loaded - t_start, 2), "fit_seconds": round(fit_seconds, 1),
            "wall_seconds": round(time.perf_counter() - t_start, 1),
            "backend": keras.backend.backend(), "keras": keras.__version__, "device": _device(),
        }
        atomic_write_json(out / "metrics.json", metrics)
        log.info("test accuracy %.3f (macro-F1 %.3f) -> %s", metrics["test_accuracy"], metrics["macro_f1"], out)
        return metrics


def _classification_metrics(y_true: np.ndarray, y_pred: np.ndarray, classes: list[str]) -> dict:
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support

    labels = list(range(len(classes)))
    prec, rec, f1, support = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    return {
        "test_accuracy": float(accuracy_score(y_true, y_pred)) if len(y_true) else None,
        "macro_f1": float(f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0)),
        "per_class": {c: {"precision": float(prec[i]), "recall": float(rec[i]), "f1": float(f1[i]),
                          "support": int(support[i])} for i, c in enumerate(classes)},
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=labels).tolist(),
    }


# ---------------------------------------------------------------- curate predict


def load_model(model_path: str | os.PathLike) -> keras.Model:
    """Load a .keras model written by `curate train` (custom layers registered)."""
    keras = _keras()
    path = Path(model_path)
    if not path.is_file():
        raise CurateError(f"{path}: model not found")
    try:
        return keras.models.load_model(path)
    except Exception as exc:  # noqa: BLE001 -- a corrupt or foreign file: tell the user which
        raise CurateError(f"{path}: not a loadable Keras model ({type(exc).__name__}: {exc})") from None


PREDICT_BATCH = 256  # images decoded and predicted at a time: memory stays flat for a folder of any size


def images_in(folder: str | os.PathLike) -> list[str]:
    """Every image file (by extension, as scan takes them) anywhere under `folder`, sorted; hidden files and
    folders are left out and linked folders are not followed, as in scan."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        found += [os.path.join(dirpath, f) for f in filenames
                  if not f.startswith(".") and os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS]
    return sorted(found)


def predict_images(model_path: str | os.PathLike, images: Sequence[str],
                   batch_size: int = PREDICT_BATCH) -> Iterator[str]:
    """One line per image, in order, as each batch is predicted: `path<TAB>predicted class<TAB>class=probability
    ...` (classes from classes.json beside the model; class indices if it is missing). A folder stands for
    every image under it (`images_in`). An unreadable image, or a folder without images, gets a warning and
    an ERROR line."""
    model = load_model(model_path)
    size = int(model.input_shape[1])
    meta = Path(model_path).with_name("classes.json")
    n_out = int(model.output_shape[-1])
    classes = read_json(meta)["classes"] if meta.exists() else [str(i) for i in range(n_out)]

    def files() -> Iterator[tuple[str, str | None]]:  # (path, why it cannot be predicted)
        for path in images:
            if not os.path.isdir(path):
                yield path, None
            elif found := images_in(path):
                yield from ((f, None) for f in found)
            else:
                log.warning("%s: no image files in this folder (%s)", path, ", ".join(sorted(IMAGE_EXTENSIONS)))
                yield path, "no image files in this folder"

    pending = files()
    while chunk := list(itertools.islice(pending, batch_size)):
        lines, batch, where = [""] * len(chunk), [], []
        for i, (img, problem) in enumerate(chunk):
            if problem:
                lines[i] = f"{img}\tERROR\t{problem}"
                continue
            try:
                batch.append(tdata.decode_image(img, size))
                where.append(i)
            except Exception as exc:  # noqa: BLE001
                log.warning("skipping unreadable image %s (%s)", img, exc)
                lines[i] = f"{img}\tERROR\tunreadable ({type(exc).__name__})"
        if batch:
            probs = np.asarray(model.predict(np.stack(batch), verbose=0))
            for i, pr in zip(where, probs, strict=True):
                ranked = " ".join(f"{c}={pr[j]:.3f}" for j, c in enumerate(classes))
                lines[i] = f"{chunk[i][0]}\t{classes[int(pr.argmax())]}\t{ranked}"
        yield from lines
