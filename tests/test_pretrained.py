"""The bundled ImageNet MobileNetV2 (curate.pretrained): its weights, what they tell apart, its cache."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import make_dataset, real_photos

from curate import labels as L
from curate import pretrained
from curate.embed import cheap_features
from curate.io import journal_parts
from curate.scan import scan
from train.data import decode_image


@pytest.fixture(scope="module")
def model():
    return pretrained.load_mobilenet_v2()


def _leave_one_out_accuracy(emb: np.ndarray, labels: np.ndarray) -> float:
    sim = emb @ emb.T
    np.fill_diagonal(sim, -np.inf)
    return float((labels[sim.argmax(1)] == labels).mean())


def test_every_layer_gets_its_bundled_weights(model):
    from train.backend import keras

    with np.load(pretrained.WEIGHTS) as arrays:
        names = set(arrays.files)
        total = sum(arrays[n].size for n in names)
    layers = [layer for layer in model.layers if layer.weights]
    assert all(isinstance(layer, keras.layers.Conv2D | keras.layers.DepthwiseConv2D | keras.layers.BatchNormalization)
               for layer in layers)
    # every weight of the network comes from the file, and every array of the file is used
    assert {f"{layer.name}.{w.name}" for layer in layers for w in layer.weights} == names
    assert model.count_params() == total == 2_257_984
    assert model.output_shape == (None, pretrained.WIDTH)


def test_it_tells_real_flower_classes_apart_better_than_the_cheap_features(model):
    # 8 real photos of each class; each photo takes the class of its most similar other photo. Measured:
    # 0.725 with the bundled weights, 0.375 with the same network untrained, 0.50 with the cheap features
    paths = real_photos(8)
    labels = np.array([p.parent.name for p in paths])
    images = np.stack([decode_image(p, pretrained.INPUT_SIZE) for p in paths])
    emb = pretrained.embed_images(model.predict_on_batch, images)
    # unit length, each of the two parts half of it
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)
    for part in (pretrained.bottleneck_features(emb), pretrained.last_conv_features(emb)):
        np.testing.assert_allclose(np.linalg.norm(part, axis=1), np.sqrt(0.5), atol=1e-5)
    assert pretrained.bottleneck_features(emb).shape[1] + pretrained.last_conv_features(emb).shape[1] == emb.shape[1]
    # a photo and its mirror image are nearly the same photo to it; two photos of the same class are not
    mirrored = pretrained.embed_images(model.predict_on_batch, images[:3, :, ::-1])
    assert ((mirrored * emb[:3]).sum(1) > 0.9).all() and emb[0] @ emb[1] < 0.9
    small = images[:, ::2, ::2][:, :96, :96]  # the cheap features' own size
    cheap = L.l2_normalise(cheap_features(np.ascontiguousarray(small)))
    assert _leave_one_out_accuracy(emb, labels) >= 0.6
    assert _leave_one_out_accuracy(emb, labels) > _leave_one_out_accuracy(cheap, labels) + 0.1


def test_the_tflite_interpreter_gives_what_keras_gives(tmp_path, model):
    images = np.stack([decode_image(p, pretrained.INPUT_SIZE) for p in real_photos(2)])
    path = tmp_path / "mobilenet_v2.tflite"
    predict = pretrained.tflite_predictor(model, path)
    assert predict is not None and path.stat().st_size > 8_000_000  # float32 weights inside
    fast = pretrained.embed_images(predict, images, batch_size=4)  # batches of 4, then the last 2
    np.testing.assert_allclose(fast, pretrained.embed_images(model.predict_on_batch, images), atol=1e-4)
    # converted once: a second predictor loads the saved file
    mtime = path.stat().st_mtime_ns
    np.testing.assert_allclose(pretrained.embed_images(pretrained.tflite_predictor(model, path), images[:3]),
                               fast[:3], atol=1e-6)
    assert path.stat().st_mtime_ns == mtime


def test_a_sunflower_field_filed_with_daisies_is_among_the_least_typical_daisies(tmp_path, model):
    data = make_dataset(tmp_path / "data", 10, ["daisy"])
    shutil.copyfile(real_photos(1, ["sunflowers"])[0], data / "daisy" / "stray.jpg")  # a field of sunflowers
    paths = sorted((data / "daisy").glob("*.jpg"))
    images = np.stack([decode_image(p, pretrained.INPUT_SIZE) for p in paths])
    emb = pretrained.embed_images(model.predict_on_batch, images)
    typical = L.typicality_quality(pretrained.bottleneck_features(emb), np.zeros(len(paths), int), k=5)
    # measured: third of the 11 (by the last convolution's features too); the two below it are daisies in a
    # braid of hair and on a lawn beside legs
    order = [paths[i].name for i in np.argsort(typical)]
    assert "stray.jpg" in order[:3]


def test_typicality_of_a_photo_alone_in_its_class_is_the_median():
    emb = L.l2_normalise(np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.5, 0.5]]))
    q = L.typicality_quality(emb, np.array([0, 0, 0, 1]), k=2)
    assert q[3] == np.median(q[:3])
    assert np.argmin(q[:3]) == 2  # the one unlike the other two


def test_typicality_compares_a_small_class_with_the_same_share_of_it_as_a_big_one():
    # a class of 45 and one of 500 drawn alike: with the 30 most similar photos, the 45 are compared with most of
    # their class and all look atypical (a class of 45 among 540 flower photos was flagged whole); with k a share
    # of the class they rank as the 500 do
    rng = np.random.default_rng(0)
    emb = L.l2_normalise(rng.standard_normal((545, 16)) + 2.0 * np.eye(16)[0])
    labels = np.array([0] * 500 + [1] * 45)
    fixed = L.percentile_rank(L.typicality_quality(emb, labels, k=30))
    shared = L.percentile_rank(L.typicality_quality(emb, labels, k=30, share=0.06))
    assert fixed[labels == 1].mean() < 0.25
    assert 0.35 < shared[labels == 1].mean() < 0.65
    # a class of 500 is compared with its 30 most similar photos either way
    np.testing.assert_array_equal(L.typicality_quality(emb[:500], labels[:500], k=30),
                                  L.typicality_quality(emb[:500], labels[:500], k=30, share=0.06))


def test_embeddings_are_cached_resumed_and_redone_when_a_file_changes(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("CURATE_CACHE", str(tmp_path / "user_cache"))
    data = make_dataset(tmp_path / "data", 3, ["daisy", "roses"])
    run = tmp_path / "run"
    scan(data, out=run, progress=False)
    manifest = pd.read_csv(run / "manifest.csv", keep_default_na=False)
    calls: list[int] = []
    interrupted: list[bool] = []
    embed_images = pretrained.embed_images

    def counted(model, images, batch_size=pretrained.BATCH):
        calls.append(len(images))
        if len(calls) == 2 and not interrupted:
            interrupted.append(True)
            raise KeyboardInterrupt  # interrupted during the second chunk, once
        return embed_images(model, images, batch_size)

    monkeypatch.setattr(pretrained, "CHUNK", 4)
    monkeypatch.setattr(pretrained, "embed_images", counted)
    with pytest.raises(KeyboardInterrupt):
        pretrained.embeddings(run, data, manifest)
    assert calls == [4, 2]
    cache = run / "cache" / "mobilenet_v2.npz"  # the finished chunk was saved as a journal part
    assert not cache.exists() and [p.name for p in journal_parts(cache)] == ["mobilenet_v2.npz.part-00000"]
    calls.clear()
    first = pretrained.embeddings(run, data, manifest)  # resumes: only the 2 photos not saved yet
    assert calls == [2] and first.shape == (6, pretrained.WIDTH)
    assert cache.is_file() and journal_parts(cache) == []  # ... and merged the journal into one file
    calls.clear()
    assert np.array_equal(pretrained.embeddings(run, data, manifest), first) and calls == []
    # a damaged journal part is named, and the photos it held are embedded again
    (run / "cache" / "mobilenet_v2.npz.part-00007").write_bytes(b"cut short")
    cache.unlink()
    with caplog.at_level(logging.WARNING, logger="curate.pretrained"):
        assert np.array_equal(pretrained.embeddings(run, data, manifest), first)
    assert "mobilenet_v2.npz.part-00007: unreadable" in caplog.text
    assert calls == [4, 2] and cache.is_file() and journal_parts(cache) == []
    calls.clear()
    caplog.clear()
    # another photo under the same name (its content hash changes) is embedded again, the others are not
    changed = manifest.assign(sha256=lambda d: d["sha256"].where(d.index != 0, "0" * 64))
    pretrained.embeddings(run, data, changed)
    assert calls == [1]
    # a photo that cannot be decoded is named in the log and embedded as a black image
    calls.clear()
    (data / "roses" / "broken.jpg").write_bytes(b"not a jpeg")
    broken = pd.concat([manifest, pd.DataFrame([{"filepath": "roses/broken.jpg", "sha256": "1" * 64}])],
                       ignore_index=True)
    with caplog.at_level(logging.WARNING, logger="curate.pretrained"):
        out = pretrained.embeddings(run, data, broken)
    assert "roses/broken.jpg: cannot decode" in caplog.text
    assert calls == [1] and out.shape == (7, pretrained.WIDTH)

    # the network was converted once, into the user's cache, not into the run's
    name = f"mobilenet_v2_v{pretrained.EMBEDDING_VERSION}.tflite"
    converted = tmp_path / "user_cache" / name
    assert converted.is_file() and not (run / "cache" / name).exists()
    # another run finds it there, and needs neither TensorFlow's converter nor the Keras model
    import tensorflow as tf

    monkeypatch.setattr(tf.lite.TFLiteConverter, "from_concrete_functions",
                        lambda *a, **k: pytest.fail("converted again"))
    monkeypatch.setattr(pretrained, "load_mobilenet_v2", lambda: pytest.fail("built the Keras model"))
    assert np.array_equal(pretrained.embeddings(tmp_path / "other_run", data, manifest), first)


def test_a_damaged_converted_network_is_named_and_converted_again(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("CURATE_CACHE", str(tmp_path / "user_cache"))
    converted = tmp_path / "user_cache" / f"mobilenet_v2_v{pretrained.EMBEDDING_VERSION}.tflite"
    converted.parent.mkdir()
    converted.write_bytes(b"cut short")
    with caplog.at_level(logging.WARNING, logger="curate.pretrained"):
        predict = pretrained.network_predictor(tmp_path / "run")
    assert f"{converted}: unreadable" in caplog.text
    assert converted.stat().st_size > 1_000_000  # overwritten by a whole conversion
    assert predict(np.zeros((1, pretrained.INPUT_SIZE, pretrained.INPUT_SIZE, 3), np.float32)).shape == (
        1, pretrained.WIDTH)


def test_a_read_only_user_cache_keeps_the_converted_network_in_the_run(tmp_path, monkeypatch):
    user_cache = tmp_path / "user_cache"
    monkeypatch.setenv("CURATE_CACHE", str(user_cache))
    write = pretrained.atomic_write_bytes

    def read_only_home(path, data):
        if Path(path).parent == user_cache:
            raise PermissionError(13, "Permission denied", str(path))
        write(path, data)

    monkeypatch.setattr(pretrained, "atomic_write_bytes", read_only_home)
    predict = pretrained.network_predictor(tmp_path / "run")
    name = f"mobilenet_v2_v{pretrained.EMBEDDING_VERSION}.tflite"
    assert (tmp_path / "run" / "cache" / name).is_file() and not (user_cache / name).exists()
    assert predict(np.zeros((2, pretrained.INPUT_SIZE, pretrained.INPUT_SIZE, 3), np.float32)).shape == (
        2, pretrained.WIDTH)
