"""What else is in a photo: people, man-made structure, depth of field, colour and foliage, measured offline.

A model trained from scratch on the folder labels learns a coherent off-class group (parade bands in
roses/, windmills in tulips/, portraits in sunflowers/) as part of the class, so its disagreement misses
them. These measures do not depend on the labels:
- `face_score`, `body_score`: the most confident face and person found by two small pretrained
  detectors of MediaPipe's, bundled with curate (curate.people). A photo of a person is rarely a photo
  of the class's object. They replaced OpenCV's frontal-face Haar cascade, which finds only large
  frontal faces and took 25 ms per photo (the two detectors: 21 ms together).
- `straight_edges`: total length of long, near-horizontal or near-vertical line segments (OpenCV's
  line segment detector) within the central 80% of the frame, relative to the photo's diagonal:
  buildings, interiors, vehicles, fences. The outer tenth at each side is cut off: a frame, a border or
  a print's edge is not structure in the scene (bench/flag_eval.py: AP alone 0.14 -> 0.20).
- `in_focus`: how much of the frame is as sharp as its sharpest part (median over an 8x8 grid of the
  mean Laplacian magnitude, over its maximum). A close-up of a flower has a shallow depth of field, a
  sharp subject on a blurred background; a landscape, street, parade or room is sharp across the frame.
- `colourfulness`: Hasler and Suesstrunk's colourfulness (spread and strength of the opponent colours
  red-green and yellow-blue). Its component is ranked within the photo's class, since classes differ
  (white daisies, yellow dandelions): a photo much greyer than its class's photos (a street, a portrait,
  a black-and-white wedding) rarely shows its flowers.
- `foliage`: the share of the frame's pixels that are green (a leaf's hue, saturated and bright enough):
  leaves, stems and grass, which a flower in a garden or a field shows, and a cake or a teacup with roses on
  it, a statue, a room or an animal rarely does. Ranked within the class like colour, since classes differ
  in how much green they show (a field of sunflowers, a rose in a vase), and a green-free dataset (parts
  on a conveyor) ties every photo, so it changes nothing there.

They become six label_quality components, `q_face`, `q_body`, `q_structure`, `q_focus`, `q_colour` and
`q_foliage` (low = suspicious). bench/flag_eval.py measured them on the hand audit: alone AP 0.21, 0.20,
0.20, 0.09 and 0.14 (base rate 0.066); with the model components AP 0.17 -> 0.26 (Haar faces, edges) ->
0.30 (depth of field) -> ~0.37 (colour) -> 0.39 (edges only within the frame), before look-alikes
(curate.labels); with look-alikes 0.477, 0.548 with the two person detectors in place of the cascade, and
0.571 when a confident face ranks its photo first (curate.labels.FlagConfig.sure_face); foliage alone
0.09, and 0.586 -> 0.606 added to the full recipe (a second seed: 0.578 -> 0.584; docs/flagging.md). They
encode an assumption, that the classes are colourful natural objects photographed close up, and that
people, straight man-made edges, deep focus and grey scenes are not what the folders are about; for a
dataset where they are (parts on a production line), leave them out: `curate flag --no-scene`. One case is
recognised without it: a class in which someone is found in many photos (PEOPLE_CLASS_SHARE) is about
people, and q_face, q_body and the sure-face rule leave its photos alone (`classes_of_people`).

Measured once per photo on a thumbnail (longest side 320 px), cached in `<run>/cache/scene.csv` by
file path, content hash and MEASURES_VERSION, so a rerun or an interrupted run measures only what is missing.
"""

from __future__ import annotations

import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from curate import people
from curate.io import (
    DECODE_VERSION,
    append_journal,
    compact_journal,
    open_upright,
    photo_cache_keys,
    read_journaled,
    safe_relpath,
)

log = logging.getLogger("curate.scene")

SCENE_COLUMNS = ["face_score", "body_score", "straight_edges", "in_focus", "colourfulness", "foliage"]
NOTHING_FOUND = {"face_score": 0.0, "body_score": 0.0, "straight_edges": 0.0, "in_focus": 0.0, "colourfulness": 0.0,
                 "foliage": 0.0}
# their label_quality components
SCENE_COMPONENTS = ["q_face", "q_body", "q_structure", "q_focus", "q_colour", "q_foliage"]
FOCUS_GRID = 8  # in_focus compares the sharpness of 8 x 8 tiles of the photo
SIDE = 320  # longest side of the measured thumbnail
CHUNK = 500  # photos measured between two saves of the cache
# a detector's score counts from here up; below it, petals and seed heads pass for faces at low confidence
# and the score only adds noise (bench/flag_ablation.py, label_quality AP from 0.5/0.6/0.7/0.8: .529/.547/.548/.533)
PERSON_THRESHOLD = 0.7
# a class in which a face or a person is found in at least this share of the photos is about people: the
# person measures and the sure-face rule leave its photos alone. On flower_photos the most is 8% (sunflowers,
# portraits filed there). A class of people photos (201 photos of flower_photos with someone in them, as a
# class of its own beside 200 daisies and 200 dandelions) reaches 49%: the detectors miss many people, so
# "most photos" would be too strict. Before this rule 48 of that run's 50 lowest label_quality were its photos
# (the 30% is said in `curate flag --help`, README.md and docs/flagging.md)
PEOPLE_CLASS_SHARE = 0.3
EDGE_MARGIN = 0.1  # straight_edges counts a segment only where it is at least this share of the frame from every side
# part of every cache key: bump it when a measure's definition changes, so old values are measured again
MEASURES_VERSION = 4
# foliage counts a pixel as green from hue 70 to 160 degrees (OpenCV's 0..180 scale: 35..80), at saturation and
# value above 20% and 15% (below them a pixel's hue is noise); other hue ranges (36-160 degrees, or 50-90, the
# yellow-greens only) gave label_quality AP within 0.002 of it (docs/flagging.md)
FOLIAGE_HUE = (35, 80)
FOLIAGE_MIN_SATURATION = 0.2
FOLIAGE_MIN_VALUE = 0.15
_local = threading.local()


def _line_detector():
    """One line detector per thread: OpenCV does not promise it is thread-safe."""
    import cv2

    if not hasattr(_local, "lines"):
        _local.lines = cv2.createLineSegmentDetector()
    return _local.lines


def thumbnail(path: Path, side: int = SIDE) -> np.ndarray:
    """The photo as displayed (EXIF orientation applied), RGB, longest side at most `side` pixels."""
    im = open_upright(path, draft=side * 2)
    im.thumbnail((side, side), Image.BILINEAR)
    return np.asarray(im, dtype=np.uint8)


def colourfulness(rgb: np.ndarray) -> float:
    """Hasler and Suesstrunk (2003): spread plus 0.3 x mean strength of the red-green and yellow-blue
    opponent colours; 0 for a grey image, ~15 for muted colours, ~100+ for vivid flowers."""
    r, g, b = (rgb[..., i].astype(np.float32) for i in range(3))
    rg, yb = r - g, (r + g) / 2 - b
    return float(np.hypot(rg.std(), yb.std()) + 0.3 * np.hypot(rg.mean(), yb.mean()))


def foliage(rgb: np.ndarray) -> float:
    """Share (0..1) of the pixels that are green (FOLIAGE_HUE, saturated and bright enough): leaves, stems
    and grass, which a photo of a flower in a garden or a field shows and a cake, a teacup, a statue, a room
    or an animal rarely does."""
    import cv2

    hsv = cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2HSV)
    h, s, v = hsv[..., 0], hsv[..., 1], hsv[..., 2]
    green = ((h >= FOLIAGE_HUE[0]) & (h <= FOLIAGE_HUE[1]) & (s > FOLIAGE_MIN_SATURATION * 255)
             & (v > FOLIAGE_MIN_VALUE * 255))
    return float(green.mean())


def share_inside(segments: np.ndarray, x0: float, x1: float, y0: float, y1: float) -> np.ndarray:
    """Share (0..1) of each segment (rows x1, y1, x2, y2) inside the box [x0, x1] x [y0, y1]
    (Liang-Barsky clipping)."""
    start, delta = segments[:, :2], segments[:, 2:] - segments[:, :2]
    lo, hi = np.zeros(len(segments)), np.ones(len(segments))
    for axis, (a, b) in enumerate(((x0, x1), (y0, y1))):
        p, d = start[:, axis], delta[:, axis]
        flat = d == 0  # parallel to this axis' walls: wholly in or wholly out
        with np.errstate(divide="ignore", invalid="ignore"):
            ta, tb = (a - p) / d, (b - p) / d
        inside = (p >= a) & (p <= b)
        lo = np.maximum(lo, np.where(flat, np.where(inside, 0.0, np.inf), np.minimum(ta, tb)))
        hi = np.minimum(hi, np.where(flat, np.where(inside, 1.0, -np.inf), np.maximum(ta, tb)))
    return np.clip(hi - lo, 0.0, 1.0)


def measure_photo(image: np.ndarray) -> dict[str, float]:
    """face_score and body_score (the most confident face and person, 0..1, curate.people; 0 when no
    TFLite interpreter is installed), straight_edges (long h/v lines / diagonal),
    in_focus (median tile sharpness / sharpest tile's, 0..1), colourfulness (0 for a grey image), foliage
    (share of green pixels, 0..1; 0 for a grey image).

    `image`: H x W x 3 RGB or H x W grey (uint8)."""
    import cv2

    lines = _line_detector()
    grey = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY) if image.ndim == 3 else image
    h, w = grey.shape
    out = dict(NOTHING_FOUND)
    if image.ndim == 3:
        out["colourfulness"] = colourfulness(image)
        out["foliage"] = foliage(image)
    if min(h, w) < 24:  # too small to show a person or a scene: nothing to find
        return out
    if people.available():
        out.update(people.person_scores(image if image.ndim == 3 else np.dstack([image] * 3)))
    segs = lines.detect(grey)[0]
    if segs is not None:
        s = segs.reshape(-1, 4)
        dx, dy = np.abs(s[:, 2] - s[:, 0]), np.abs(s[:, 3] - s[:, 1])
        length = np.hypot(dx, dy)
        angle = np.degrees(np.arctan2(dy, dx))
        diag = float(np.hypot(h, w))
        # only the part inside the central box counts: a frame or border is not structure in the scene
        length = length * share_inside(s, EDGE_MARGIN * w, (1 - EDGE_MARGIN) * w,
                                       EDGE_MARGIN * h, (1 - EDGE_MARGIN) * h)
        # long (> 5% of the diagonal) and within 5 degrees of horizontal or vertical: built, not grown
        keep = (length > 0.05 * diag) & ((angle < 5) | (angle > 85))
        out["straight_edges"] = float(length[keep].sum() / diag)
    sharpness = np.abs(cv2.Laplacian(grey.astype(np.float32), cv2.CV_32F, ksize=3))
    # INTER_AREA averages each tile's pixels: a map of mean sharpness per tile
    tiles = cv2.resize(sharpness, (FOCUS_GRID, FOCUS_GRID), interpolation=cv2.INTER_AREA)
    if tiles.max() > 0:  # a flat image has no sharp part: nothing in focus
        out["in_focus"] = float(np.median(tiles) / tiles.max())
    return out


def measure(run_dir: Path, data_root: Path, manifest: pd.DataFrame, progress: bool = False) -> pd.DataFrame:
    """SCENE_COLUMNS for every row of `manifest` (its order), from the cache where the file is unchanged.

    A photo that cannot be decoded is logged by name and measured as empty (no people, no edges); rows
    with a scan `error` are left unscored by the caller anyway.
    """
    from tqdm import tqdm

    cache_path = Path(run_dir) / "cache" / "scene.csv"
    # values measured without the person detectors are kept apart from values measured with them
    with_people = people.available()
    # ... and so are values measured from pixels decoded another way (DECODE_VERSION)
    version = f"|v{MEASURES_VERSION}.d{DECODE_VERSION}" + ("" if with_people else "-nopeople")
    if not with_people:
        log.warning("no TFLite interpreter (tensorflow or ai_edge_litert): face_score and body_score "
                    "are not measured")
    key = photo_cache_keys(manifest, version)
    # values measured by an earlier definition of the measures are dropped, not reused
    known = {k: v for k, v in read_journaled(cache_path, _read, log.warning).items() if k.endswith(version)}
    todo = [i for i, k in enumerate(key) if k not in known]

    def one(i: int) -> dict[str, float]:
        fp = manifest["filepath"].iloc[i]
        try:
            return measure_photo(thumbnail(safe_relpath(data_root, fp)))
        except (OSError, ValueError) as exc:
            log.warning("%s: cannot decode for the scene measures (%s); measured as empty", fp, exc)
            return dict(NOTHING_FOUND)

    if with_people and todo:
        people.load_quietly()  # before the thread pool: it silences the whole process's stderr for a moment
    bar = tqdm(total=len(todo), unit="img", desc="scene measures", disable=not (progress and todo), leave=False)
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        for start in range(0, len(todo), CHUNK):
            chunk = todo[start:start + CHUNK]
            for i, row in zip(chunk, pool.map(one, chunk), strict=True):
                known[key.iloc[i]] = row
                bar.update(1)
            # saved after each chunk: an interrupted run keeps what it measured
            append_journal(cache_path, {key.iloc[i]: known[key.iloc[i]] for i in chunk}, _write)
    bar.close()
    compact_journal(cache_path, known, _write)
    return pd.DataFrame([known[k] for k in key], columns=SCENE_COLUMNS)


def _read(path: Path) -> dict[str, dict[str, float]]:
    cached = pd.read_csv(path, keep_default_na=False)
    if not set(SCENE_COLUMNS) <= set(cached.columns):  # written before a measure was added: measured again
        return {}
    return dict(zip(cached["key"].astype(str), cached[SCENE_COLUMNS].to_dict("records"), strict=True))


def _write(path: Path, rows: dict[str, dict[str, float]]) -> None:
    pd.DataFrame([{"key": k, **v} for k, v in rows.items()], columns=["key", *SCENE_COLUMNS]).to_csv(path, index=False)


def detected(scores: pd.Series | np.ndarray, threshold: float) -> np.ndarray:
    """A detector's scores from `threshold` up, 0 below it (counted as nothing found)."""
    scores = np.asarray(scores, dtype=float)
    return np.where(scores >= threshold, scores, 0.0)


def people_share(measures: pd.DataFrame, labels: np.ndarray,
                 person_threshold: float = PERSON_THRESHOLD) -> np.ndarray:
    """Per class (index = label): the share of its photos in which a face or a person is found, from
    `person_threshold` up."""
    labels = np.asarray(labels)
    found = (detected(measures["face_score"], person_threshold) > 0) | (
        detected(measures["body_score"], person_threshold) > 0)
    n_classes = int(labels.max()) + 1 if len(labels) else 0
    photos = np.bincount(labels, minlength=n_classes)
    return np.bincount(labels, weights=found, minlength=n_classes) / np.maximum(photos, 1)


def classes_of_people(measures: pd.DataFrame, labels: np.ndarray,
                      person_threshold: float = PERSON_THRESHOLD, share: float = PEOPLE_CLASS_SHARE) -> np.ndarray:
    """Per class (index = label): True where a face or a person is found in at least `share` of its
    photos. People are then what that class is about (workers with and without helmets, operators at a
    machine), and finding one says nothing against its photos."""
    return people_share(measures, labels, person_threshold) >= share


def rank_within(values: pd.Series, labels: np.ndarray) -> np.ndarray:
    """Each value's percentile rank within its class, centred: (rank - 0.5) / class size, ties averaged.
    A class whose values are all alike gets 0.5 whatever its size, so a measure that finds nothing
    anywhere (no green in a dataset of grey parts) leaves the ranking of the run as it was."""
    by_class = values.groupby(np.asarray(labels))
    return ((by_class.rank() - 0.5) / by_class.transform("size")).to_numpy()


def scene_quality(measures: pd.DataFrame, labels: np.ndarray,
                  person_threshold: float = PERSON_THRESHOLD) -> dict[str, np.ndarray]:
    """SCENE_COMPONENTS, low = more suspicious: q_face and q_body (a more confident face or person
    detection, from `person_threshold` up; all below it score alike; not counted in a class of people,
    `classes_of_people`), q_structure (more straight edges), q_focus (more of the frame in focus),
    q_colour (colourfulness as a percentile rank within the photo's class, `labels`: less colourful than
    the class's other photos), q_foliage (the share of green pixels as a percentile rank within the class:
    less green than the class's other photos)."""
    labels = np.asarray(labels)
    counted = ~classes_of_people(measures, labels, person_threshold)[labels]
    colour = pd.Series(measures["colourfulness"].to_numpy(dtype=float))
    green = pd.Series(measures["foliage"].to_numpy(dtype=float))
    return {"q_face": -detected(measures["face_score"], person_threshold) * counted,
            "q_body": -detected(measures["body_score"], person_threshold) * counted,
            "q_structure": -measures["straight_edges"].to_numpy(dtype=float),
            "q_focus": -measures["in_focus"].to_numpy(dtype=float),
            "q_colour": colour.groupby(labels).rank(pct=True).to_numpy(),
            "q_foliage": rank_within(green, labels)}
