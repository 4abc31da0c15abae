"""curate.people: MediaPipe's face and person detectors, run offline from the bundled models, on real photos."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from curate import people, scene
from tests.conftest import FLOWERS, real_photos

# picked by eye, not from the audit: a head-and-shoulders portrait in a sunflower field, and a man
# standing small in the middle of a tulip field (no face visible at that size)
PORTRAIT = FLOWERS / "sunflowers" / "4933230395_7930697335_m.jpg"
FIGURE_IN_A_FIELD = FLOWERS / "tulips" / "13513644515_a51470b899.jpg"


def test_the_bundled_models_load_offline():
    assert people.available()
    for file, side in people.DETECTORS.values():
        assert (people.MODELS_DIR / file).stat().st_size > 100_000
        assert side in (192, 224)


def test_a_portrait_has_a_face_and_a_person_and_flower_close_ups_have_neither():
    portrait = people.person_scores(scene.thumbnail(PORTRAIT))
    assert portrait["face_score"] >= scene.PERSON_THRESHOLD and portrait["body_score"] >= scene.PERSON_THRESHOLD
    # mirrored, it is the same portrait
    mirrored = people.person_scores(np.ascontiguousarray(scene.thumbnail(PORTRAIT)[:, ::-1]))
    assert mirrored["face_score"] >= scene.PERSON_THRESHOLD
    figure = people.person_scores(scene.thumbnail(FIGURE_IN_A_FIELD))
    assert figure["body_score"] >= scene.PERSON_THRESHOLD > figure["face_score"]
    for photo in real_photos(2, ["daisy", "dandelion"]):
        flowers = people.person_scores(scene.thumbnail(photo))
        assert max(flowers.values()) < scene.PERSON_THRESHOLD, photo.name


def test_letterbox_keeps_the_aspect_ratio_and_pads_with_black():
    image = np.full((100, 300, 3), 255, np.uint8)
    square = people.letterbox(image, 192)
    assert square.shape == (192, 192, 3) and square.dtype == np.float32
    rows = np.flatnonzero(square[:, 96, 0] > 0)  # the white photo spans 64 of 192 rows, centred
    assert rows[0] == 64 and rows[-1] == 127
    assert square[0, 0, 0] == -1.0 and square[96, 0, 0] == 1.0


def test_scene_measures_carry_the_scores_and_rank_a_detection_below_the_threshold_as_none():
    measured = scene.measure_photo(scene.thumbnail(PORTRAIT))
    assert measured["face_score"] == pytest.approx(people.person_scores(scene.thumbnail(PORTRAIT))["face_score"])
    # and 8 photos with no one in them, so that the class is not one of people (scene.classes_of_people)
    measures = pd.DataFrame({"face_score": [0.1, 0.69, 0.75, 0.95, *[0.0] * 8],
                             "body_score": [0.95, 0.0, 0.0, 0.3, *[0.0] * 8], "straight_edges": 0.0,
                             "in_focus": 0.0, "colourfulness": 10.0, "foliage": 0.2})
    q = scene.scene_quality(measures, np.zeros(12, int))
    # below PERSON_THRESHOLD all score alike; above it, a more confident face is more suspicious
    assert q["q_face"][0] == q["q_face"][1] == 0.0 > q["q_face"][2] > q["q_face"][3]
    assert q["q_body"][0] < q["q_body"][1] == q["q_body"][2] == q["q_body"][3] == 0.0


def test_without_an_interpreter_the_scores_are_not_measured_and_not_cached_as_measured(tmp_path, monkeypatch, caplog):
    paths = [PORTRAIT]
    m = pd.DataFrame({"filepath": [p.relative_to(FLOWERS).as_posix() for p in paths], "sha256": ["h0"]})
    monkeypatch.setattr(people, "available", lambda: False)
    without = scene.measure(tmp_path, FLOWERS, m)
    assert without.loc[0, "face_score"] == 0.0 and without.loc[0, "body_score"] == 0.0
    assert "face_score and body_score are not measured" in caplog.text
    monkeypatch.undo()
    # with the interpreter back, the photo is measured again rather than read from the cache
    with_detectors = scene.measure(tmp_path, FLOWERS, m)
    assert with_detectors.loc[0, "face_score"] >= scene.PERSON_THRESHOLD


def test_tensorflows_own_interpreter_gives_the_same_scores_as_litert(monkeypatch):
    import threading

    import tensorflow as tf

    image = scene.thumbnail(PORTRAIT)
    litert = people.person_scores(image)
    monkeypatch.setattr(people, "_local", threading.local())  # fresh interpreters, from TensorFlow's class
    monkeypatch.setattr(people, "interpreter_class", lambda: tf.lite.Interpreter)
    assert people.person_scores(image) == pytest.approx(litert, abs=1e-4)
