"""curate.scene: the face, person, straight-edge, depth-of-field, colour and foliage measures on real photos,
and their cache."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from curate import scene
from curate.io import journal_parts
from tests.conftest import real_photos


def _manifest(root, paths) -> pd.DataFrame:
    return pd.DataFrame({"filepath": [p.relative_to(root).as_posix() for p in paths],
                         "sha256": [f"h{i}" for i in range(len(paths))]})


def test_thumbnail_keeps_the_aspect_ratio_and_caps_the_longest_side():
    photo = real_photos(1, ["tulips"])[0]
    with Image.open(photo) as im:
        w, h = im.size
    thumb = scene.thumbnail(photo)
    assert thumb.ndim == 3 and thumb.shape[2] == 3 and thumb.dtype == np.uint8
    assert max(thumb.shape[:2]) == scene.SIDE
    assert abs(thumb.shape[1] / thumb.shape[0] - w / h) < 0.02


def test_straight_edges_are_high_for_a_built_grid_and_low_for_real_flower_photos():
    flowers = [scene.measure_photo(scene.thumbnail(p))["straight_edges"]
               for p in real_photos(4, ["daisy", "dandelion"])]
    # a window grid: what a building, a shelf or a fence looks like to the line detector
    grid = np.full((240, 320), 200, np.uint8)
    grid[::40, :] = 30
    grid[:, ::40] = 30
    built = scene.measure_photo(grid)
    assert built["straight_edges"] > 5 * max(max(flowers), 0.1)
    assert built["face_score"] < scene.PERSON_THRESHOLD and built["body_score"] < scene.PERSON_THRESHOLD
    tilted = np.array(Image.fromarray(grid).rotate(30, fillcolor=200))  # diagonal lines are not counted
    assert scene.measure_photo(tilted)["straight_edges"] < built["straight_edges"] / 3


def test_share_inside_clips_segments_to_the_box():
    segments = np.array([[0, 5, 10, 5],  # crosses the box: 8 of its 10 units inside
                         [2, 2, 8, 2],  # wholly inside
                         [20, 20, 30, 30],  # wholly outside
                         [-1, 5, -1, 6]])  # vertical, left of the box
    np.testing.assert_allclose(scene.share_inside(segments, 1, 9, 1, 9), [0.8, 1.0, 0.0, 0.0])


def test_a_frame_around_a_flower_photo_is_not_structure(monkeypatch):
    for photo in real_photos(2, ["roses", "sunflowers"]):
        thumb = scene.thumbnail(photo)
        h, w = thumb.shape[:2]
        # a passe-partout: a white mat 8% wide with a thin dark line around the photo
        pad = int(0.08 * max(h, w))
        framed = np.full((h + 2 * pad, w + 2 * pad, 3), 245, np.uint8)
        framed[pad - 4:h + pad + 4, pad - 4:w + pad + 4] = 20
        framed[pad:h + pad, pad:w + pad] = thumb
        plain = scene.measure_photo(thumb)["straight_edges"]
        assert scene.measure_photo(framed)["straight_edges"] < plain + 0.5
        monkeypatch.setattr(scene, "EDGE_MARGIN", 0.0)  # the whole frame measured: the mat's edges count
        assert scene.measure_photo(framed)["straight_edges"] > plain + 2
        monkeypatch.undo()


def test_a_photo_smaller_than_the_face_window_measures_empty():
    assert scene.measure_photo(np.zeros((10, 500), np.uint8)) == scene.NOTHING_FOUND
    assert set(scene.NOTHING_FOUND) == set(scene.SCENE_COLUMNS) and not any(scene.NOTHING_FOUND.values())


def test_in_focus_is_high_when_the_whole_frame_is_sharp_and_low_for_a_shallow_depth_of_field():
    import cv2

    grey = scene.thumbnail(real_photos(1, ["daisy"])[0])[..., 1]
    h, w = grey.shape
    detail = grey[h // 2 - h // 8:h // 2 + h // 8, w // 2 - w // 8:w // 2 + w // 8]  # a real photo's centre
    sharp_everywhere = np.tile(detail, (4, 4))  # a landscape or a street: detail from edge to edge
    close_up = cv2.GaussianBlur(sharp_everywhere, (0, 0), 6)  # the same frame, its surroundings out of focus
    dh, dw = detail.shape
    close_up[dh * 3 // 2:dh * 5 // 2, dw * 3 // 2:dw * 5 // 2] = sharp_everywhere[dh * 3 // 2:dh * 5 // 2,
                                                                                   dw * 3 // 2:dw * 5 // 2]
    deep, shallow = (scene.measure_photo(x)["in_focus"] for x in (sharp_everywhere, close_up))
    assert deep > 0.4 and shallow < deep / 3
    assert scene.measure_photo(np.full((240, 320), 128, np.uint8))["in_focus"] == 0.0  # nothing sharp at all


def test_colourfulness_is_zero_for_grey_and_falls_as_a_real_photo_loses_its_colour():
    rgb = scene.thumbnail(real_photos(1, ["tulips"])[0])
    grey = np.repeat(rgb.mean(axis=2, keepdims=True).astype(np.uint8), 3, axis=2)
    assert scene.colourfulness(grey) == 0.0
    # halfway to grey: the opponent colours halve, and so does the measure
    faded = (rgb.astype(np.float32) + grey) / 2
    assert scene.colourfulness(faded) == pytest.approx(scene.colourfulness(rgb) / 2, rel=0.02)
    assert scene.measure_photo(rgb)["colourfulness"] == scene.colourfulness(rgb) > 0


def test_foliage_is_the_share_of_green_pixels_and_leaves_with_the_greens():
    def flat(rgb):
        return np.full((40, 60, 3), rgb, dtype=np.uint8)
    assert scene.foliage(flat((30, 160, 40))) == 1.0  # leaf green
    assert scene.foliage(flat((200, 30, 30))) == 0.0  # red petals
    assert scene.foliage(flat((0, 25, 0))) == 0.0  # too dark for its hue to mean anything
    assert scene.foliage(flat((120, 130, 120))) == 0.0  # too grey
    half = np.concatenate([flat((30, 160, 40)), flat((200, 200, 200))], axis=1)
    assert scene.foliage(half) == 0.5
    # a real dandelion in grass: much of it green; grey or with its hues turned half round (magenta), none or little
    rgb = max((scene.thumbnail(p) for p in real_photos(3, ["dandelion"])), key=scene.foliage)
    assert scene.foliage(rgb) > 0.3
    assert scene.measure_photo(rgb)["foliage"] == scene.foliage(rgb)
    grey = np.repeat(rgb.mean(axis=2, keepdims=True).astype(np.uint8), 3, axis=2)
    assert scene.foliage(grey) == 0.0
    import cv2
    hsv = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)
    hsv[..., 0] = (hsv[..., 0].astype(int) + 90) % 180  # OpenCV's hue runs 0..180: 90 is 180 degrees
    assert scene.foliage(cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)) < scene.foliage(rgb) / 10


def test_measure_caches_by_path_and_hash_and_measures_only_what_changed(tmp_path, monkeypatch):
    from tests.conftest import FLOWERS as SHARED

    paths = real_photos(2, ["roses", "tulips"])
    m = _manifest(SHARED, paths)
    first = scene.measure(tmp_path, SHARED, m)
    assert list(first.columns) == scene.SCENE_COLUMNS and len(first) == len(m)
    assert (tmp_path / "cache" / "scene.csv").exists()

    calls = []
    real = scene.measure_photo
    monkeypatch.setattr(scene, "measure_photo", lambda g: calls.append(1) or real(g))
    again = scene.measure(tmp_path, SHARED, m)
    pd.testing.assert_frame_equal(again, first)
    assert calls == []  # everything came from the cache
    m.loc[1, "sha256"] = "changed"
    scene.measure(tmp_path, SHARED, m)
    assert len(calls) == 1  # only the changed file was measured again

    # a cache written before a measure existed is measured again rather than read with a column missing
    cache = tmp_path / "cache" / "scene.csv"
    pd.read_csv(cache).drop(columns=["in_focus"]).to_csv(cache, index=False)
    calls.clear()
    pd.testing.assert_frame_equal(scene.measure(tmp_path, SHARED, m).drop(index=1),
                                  first.drop(index=1))
    assert len(calls) == len(m)

    # values cached by an earlier definition of the measures are measured again, not reused
    calls.clear()
    monkeypatch.setattr(scene, "MEASURES_VERSION", scene.MEASURES_VERSION + 1)
    scene.measure(tmp_path, SHARED, m)
    assert len(calls) == len(m)
    assert pd.read_csv(cache)["key"].str.endswith(f"|v{scene.MEASURES_VERSION}.d{scene.DECODE_VERSION}").all()
    # ... and so are values measured from pixels decoded another way
    calls.clear()
    monkeypatch.setattr(scene, "DECODE_VERSION", scene.DECODE_VERSION + 1)
    scene.measure(tmp_path, SHARED, m)
    assert len(calls) == len(m)


def test_an_interrupted_measure_keeps_the_chunks_it_finished(tmp_path, monkeypatch):
    from tests.conftest import FLOWERS as SHARED

    m = _manifest(SHARED, real_photos(2, ["daisy", "roses", "sunflowers"]))
    monkeypatch.setattr(scene, "CHUNK", 2)
    real = scene.measure_photo
    seen = []

    def stop_on_the_fifth(grey):
        seen.append(1)
        if len(seen) == 5:
            raise KeyboardInterrupt
        return real(grey)

    monkeypatch.setattr(scene, "measure_photo", stop_on_the_fifth)
    with pytest.raises(KeyboardInterrupt):
        scene.measure(tmp_path, SHARED, m)
    cache = tmp_path / "cache" / "scene.csv"
    parts = journal_parts(cache)  # two chunks of two were saved, each once, before the interruption
    assert [len(pd.read_csv(p)) for p in parts] == [2, 2] and not cache.exists()
    seen.clear()
    monkeypatch.setattr(scene, "measure_photo", lambda grey: seen.append(1) or real(grey))
    resumed = scene.measure(tmp_path, SHARED, m)
    assert len(seen) == len(m) - 4  # only what was not saved is measured again
    # ... and the journal is merged into one file, which holds what an uninterrupted run would
    assert journal_parts(cache) == [] and len(pd.read_csv(cache)) == len(m)
    pd.testing.assert_frame_equal(resumed, scene.measure(tmp_path / "fresh", SHARED, m))


def test_an_unreadable_photo_is_named_and_measured_empty(tmp_path, caplog):
    root = tmp_path / "data"
    (root / "roses").mkdir(parents=True)
    (root / "roses" / "broken.jpg").write_bytes(b"not a jpeg at all")
    m = pd.DataFrame({"filepath": ["roses/broken.jpg"], "sha256": ["x"]})
    with caplog.at_level(logging.WARNING, logger="curate.scene"):
        out = scene.measure(tmp_path / "run", root, m)
    assert out.iloc[0].tolist() == [0] * len(scene.SCENE_COLUMNS)
    assert "roses/broken.jpg" in caplog.text and "cannot decode" in caplog.text


def test_scene_quality_is_lower_for_a_person_more_edges_more_in_focus_and_less_colour_than_the_class():
    low = [0.1] * 6
    measures = pd.DataFrame({"face_score": [0.1, 0.9, *low], "body_score": [0.2, 0.8, *[0.2] * 6],
                             "straight_edges": [0.1, 3.0, *low], "in_focus": [0.1, 0.8, *low],
                             "colourfulness": [80.0, 40.0, 60.0, 70.0, 20.0, 10.0, 15.0, 5.0],
                             "foliage": [0.3, 0.0, *[0.3] * 6]})
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    q = scene.scene_quality(measures, labels)
    assert list(q) == scene.SCENE_COMPONENTS
    assert q["q_face"][1] < q["q_face"][0] and q["q_body"][1] < q["q_body"][0]
    assert q["q_structure"][1] < q["q_structure"][0]
    assert q["q_focus"][1] < q["q_focus"][0]
    # foliage, like colour, is ranked within each class: class 1's photos are all alike
    assert q["q_foliage"][1] < q["q_foliage"][0] and (q["q_foliage"][4:] == 0.5).all()
    # a dataset without green (grey parts on a conveyor): one value for every photo, whatever the class sizes,
    # so the ranking is unchanged
    uneven = np.array([0, 0, 0, 0, 0, 0, 1, 1])
    assert set(scene.scene_quality(measures.assign(foliage=0.0), uneven)["q_foliage"]) == {0.5}
    # colour is ranked within each class: 20 is the colourful one of class 1, though greyer than class 0's 40
    assert q["q_colour"].tolist() == [1.0, 0.25, 0.5, 0.75, 1.0, 0.5, 0.75, 0.25]
    # someone in 1 of 4 photos: the class is not about people; in 2 of 4 (from PEOPLE_CLASS_SHARE up) it is,
    # and finding someone counts against none of its photos, while class 1 still counts it
    assert scene.people_share(measures, labels).tolist() == [0.25, 0.0]
    crowded = measures.assign(face_score=[0.1, 0.9, 0.9, 0.1, 0.9, 0.1, 0.1, 0.1])
    assert scene.classes_of_people(crowded, labels).tolist() == [True, False]
    q = scene.scene_quality(crowded, labels)
    assert (q["q_face"][:4] == 0).all() and (q["q_body"][:4] == 0).all() and q["q_face"][4] < 0
