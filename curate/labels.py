"""`curate flag`: score every photo for label issues and off-class content.

Three views of "this photo does not belong to its folder", each its own column (low = suspicious):
- `q_cleanlab`: cleanlab's label quality on out-of-fold class probabilities (the model that scored a
  photo never trained on it).
- `q_knn`: agreement of a photo's nearest neighbours (cosine, in the embedding space) with its label.
- `q_cluster`: within-class structure. Each class's embeddings are clustered; a cluster scores low when
  it is small and its centre lies far from the class's main mass (a coherent off-class group such as
  parade photos in roses/ forms such a cluster even when a model learned it as "roses").
With trained models (the K-fold ViT) two more: `q_confidence`, the out-of-fold highest class probability
(low when a photo looks like none of the classes), and `q_features`, `q_cluster` computed on the cheap
features instead (a second, independent representation; bench/flag_ablation.py measured that adding it
helps). Six label-free components come from the scene measures (curate.scene): `q_face` and `q_body` (a
face or a person found by MediaPipe's small pretrained detectors, bundled: curate.people), `q_structure`
(long straight horizontal/vertical edges), `q_focus` (sharp across the frame rather than a close-up's
shallow depth of field), `q_colour` (less colourful than the class's other photos) and `q_foliage` (less of
the frame green than the class's other photos: no leaves, stems or grass), which catch coherent off-class
groups the models learn as the class (portraits, parades, buildings, landscapes, cakes and teacups with
roses on them). And `q_typical`: the photo's mean similarity to the 30 most similar photos of its folder, in
the bottleneck features of an ImageNet-pretrained MobileNetV2 bundled with curate (curate.pretrained), a network that
has seen a thousand kinds of things, where the K-fold ViT has seen only the folders; it weighs about as much
as all the other components together (bench/flag_eval.py: AP 0.606 -> 0.75 with the look-alikes found in its
last convolution).
All are combined by a weighted mean of their within-run percentile ranks into the photo's own score,
and `label_quality` (0..1) is half that and half `lookalike_quality`, the mean own score of its five
closest look-alikes in the same folder (by the pretrained network's embeddings; with
`FlagConfig.pretrained` off, by the cheap features: colour histogram, gradients, 8x8 thumbnail).
Off-class photos come in sessions (a parade, a portrait shoot, a garden of black-eyed Susans), so a photo
whose look-alikes are suspicious is more likely off-class than its own score says, and a lone odd score
among fine look-alikes is damped: bench/flag_eval.py measured AP 0.37 -> 0.46.
Last, a photo with a confidently found face (`FlagConfig.sure_face`) is ranked first whatever its
other scores: such a detection is all but certain evidence, which the weighted mean dilutes.
In the K-fold ViT each fold's held-out photos are embedded by that fold's model, so kNN and clusters are
computed within each fold. Optionally (`FlagConfig.retrain_pruned`, `curate flag --retrain`), confident
learning's prune and retrain: the K-fold ViT is trained again on the same folds without the first pass's
lowest-quality photos (as many as cleanlab estimates, at most `FlagConfig.max_pruned_fraction` of them), and
every photo is scored again with it; a model that never learned a parade as "roses" disagrees with that
label. Since the pretrained network it buys little for its training time (see FlagConfig).

Flags: `off_class` for the lowest-quality photos, as many as cleanlab estimates the data holds label
issues (its confident-joint noise estimate, read from the data, never from a hand audit), at most
`FlagConfig.max_off_class_fraction` of them (`curate flag --max-off-class`), and `outlier` for photos far
from every class's main mass (robust z-score of the distance to the nearest class centre).
"""

from __future__ import annotations

import dataclasses
import logging
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from curate.io import (
    CurateError,
    add_flag,
    atomic_save_npy,
    atomic_write_csv,
    data_root_of,
    read_manifest,
    resolve_run_dir,
    run_lock,
    suspicious_clusters_first,
)
from curate.scene import SCENE_COLUMNS, SCENE_COMPONENTS
from train.presets import Preset

log = logging.getLogger("curate.labels")

# Below FlagConfig().knn_k photos a class cannot fill a photo's neighbourhood: its photos look unlike their
# label to q_knn however well they fit, and cleanlab has nothing to estimate the class's noise from.
MIN_CLASS_PHOTOS = 10

FLAG_COLUMNS = ["label_quality", "lookalike_quality", "q_cleanlab", "q_knn", "q_cluster", "q_confidence",
                "q_features", "q_typical", *SCENE_COMPONENTS, *SCENE_COLUMNS, "suggested_label", "cluster",
                "models_disagreeing"]
RETIRED_COLUMNS = ["faces", "face_area"]  # the Haar cascade's measures, replaced by curate.people


@dataclass
class FlagConfig:
    """Knobs of `curate flag`; the defaults are what bench/flag_eval.py measured best."""

    folds: int = 5
    knn_k: int = 10  # neighbours for q_knn
    cluster_size: int = 25  # about one within-class cluster per this many photos
    # the model-based components weigh equally; each scene measure (curate.scene) weighs half as much as
    # all of them: bench/flag_eval.py measured AP 0.17 without them, 0.26 with faces and edges, 0.30 with
    # depth of field, ~0.37 with colour too, 0.39 with edges only within the frame (before look-alikes).
    # The two person detectors weigh 1.4 times as much (label_quality AP at 2.5/3.5/5: .536/.548/.553).
    # q_cleanlab, q_knn and q_cluster weighed twice as much while the ViT was retrained without the flagged
    # photos by default (retrain_pruned; bench/flag_ablation.py, AP at 1/1.5/2/3: .576/.583/.586/.581, before
    # q_typical). Beside q_typical they add nothing on flower_photos: first-pass folds (the default now) at
    # 0/0.5/0.75/1/1.5/2/3 give .761/.760/.758/.756/.751/.746/.734, retrained folds .764/.761/.760/.758/.755/
    # .751/.742. They stay in at 1, equal to q_confidence and q_features as before the retrain: on data unlike
    # ImageNet's (parts on a fixture) what the ViT learns of the folders may be all there is
    # q_foliage (less green than the class) at 0.5/1/1.5/2.5: .595/.601/.603/.600 on the shipped folds,
    # .589/.595/.599/.600 on a second seed's (without it .586 and .578); full re-flag at 1.5: .606 and .584
    # q_typical (unlike the rest of its folder to the pretrained network; look-alikes found there too) weighs about as
    # much as all the others together (24; the others 21 in full mode, 4.4 with --fast): at 4/6/8/12/16/24
    # .702/.713/.722/.730/.734/.734 (folds fixed; .606 without;
    # from the last convolution; from the bottleneck, as now, at 8/12/16/24/32 .728/.739/.745/.751/.753)
    weights: dict[str, float] = field(default_factory=lambda: {
        "q_cleanlab": 1.0, "q_knn": 1.0, "q_cluster": 1.0, "q_confidence": 1.0, "q_features": 1.0,
        "q_face": 3.5, "q_body": 3.5, "q_structure": 2.5, "q_focus": 2.5, "q_colour": 2.5, "q_foliage": 1.5,
        "q_typical": 24.0})
    # --fast: the cheap features' label disagreement (q_cleanlab, q_knn) ranks the audited off-class photos
    # at chance (bench/flag_eval.py: AP 0.078, base rate 0.066); only their within-class clusters carry signal
    # each scene measure weighs half as much as q_cluster here too (AP 0.131 without them, 0.222 with faces
    # and edges, ~0.35 with all four), the person detectors 1.4 times that (AP at 0.5/0.7/1.0: .472/.484/.493);
    # q_foliage at 0.3/0.4/0.5/0.7: .528/.529/.527/.519 (.515 without it)
    # q_typical as much as all the others together here too: at 2/3/4/6/8/12 .722/.729/.732/.733/.732/.726
    # (from the last convolution); from the bottleneck, as now, at 3/4.4/6/8/12 .742/.750/.754/.755/.755
    fast_weights: dict[str, float] = field(default_factory=lambda: {
        "q_cluster": 1.0, "q_face": 0.7, "q_body": 0.7, "q_structure": 0.5, "q_focus": 0.5,
        "q_colour": 0.5, "q_foliage": 0.5, "q_typical": 4.4})
    lookalikes: int = 5  # label_quality shares this many same-folder look-alikes' scores; 0 = off
    lookalike_share: float = 0.5  # their mean's share of label_quality (the photo's own score the rest)
    # a face found with at least this confidence ranks the photo first, whatever its other scores (None = off;
    # part of the scene measures, so off with scene=False too):
    # on the hand audit all 39 photos from 0.8 up are off-class or doubtful, none a fine photo of its class,
    # yet the weighted mean and the look-alikes left portraits at ranks 270-430 (bench/flag_ablation.py:
    # label_quality AP from 0.75/0.8/0.85/0.9: .549/.572/.571/.557, .548 without; --fast .484 -> .515)
    sure_face: float | None = 0.85
    scene: bool = True  # measure people, straight edges, depth of field, colour and foliage (curate.scene)
    # the bundled ImageNet MobileNetV2 (curate.pretrained): q_typical (how like the rest of its folder a photo
    # looks), and the space in which look-alikes are found (instead of the cheap features)
    pretrained: bool = True
    typical_k: int = 30  # q_typical: mean similarity to this many most similar photos of the same folder,
    # at most this share of them (30 of a class of 500; 3 of a class of 45, which with 30 was flagged whole beside
    # classes of 150-300: `typicality_quality`)
    typical_share: float = 0.06
    outlier_z: float = 3.5  # robust z of the distance to the nearest class centre
    # off_class needs out-of-fold models that agree with the labels beyond chance (one-sided test at this
    # p-value, `beats_chance`); a model at chance makes cleanlab count its guesses (on simulated inspection
    # shots the cheap features flagged 8 of 40 fine photos), and a photo's class learned beyond chance at the
    # same p-value (`classes_learned`; 8 of 12 photos of a rare class the ViT never answered were flagged; a
    # bigger class it did not learn is ranked without its disagreement, `score`).
    # None: flag anyway
    chance_p_value: float | None = 0.01
    # never flag more than this share of a run off_class (`curate flag --max-off-class`); on flower_photos
    # cleanlab's estimate is higher still, so this sets the flag's length: a shorter review list with higher
    # precision (docs/flagging.md). It never changes label_quality, nor what the retrain leaves out
    max_off_class_fraction: float = 0.2
    image_size: int = 96  # decode size of the cheap features
    group_folds: bool = True  # K-fold ViT: keep visual clusters of a first all-data ViT within one fold
    group_size: int = 20  # photos per visual group for the grouped folds
    vit: Preset | None = None  # the K-fold ViT's recipe; None = train.presets.FLAG (48 px, 15 epochs)
    flip_tta: bool = True  # average each K-fold model's predictions over the photo and its mirror image
    # confident learning's prune and retrain: train the K-fold ViT a second time, same folds, without the first
    # pass's most suspicious photos (max_pruned_fraction), and score every photo again with it. A model that
    # never learned the parade or the portrait shoot as "roses" disagrees with those labels. Before the
    # pretrained network it bought label_quality AP 0.571 -> 0.586 (bench/flag_eval.py); with q_typical
    # weighing about as much as all the other components together, 0.746 -> 0.751 (paired CI [-0.012, 0.000])
    # with the model components at weight 2, 0.756 -> 0.758 ([-0.001, +0.007]) at 1, as now, for 16 of the
    # full mode's 48 minutes on 2 cores; so it is off by default (`curate flag --retrain`)
    retrain_pruned: bool = False
    # the retrain leaves out the first pass's lowest-quality photos, as many as cleanlab estimates, at most
    # this share of the run: apart from max_off_class_fraction, so that shortening the flag never retrains
    max_pruned_fraction: float = 0.2
    seed: int = 0


def flag_config(scene: bool = True, retrain_pruned: bool = False, max_off_class: float | None = None,
                pretrained: bool = True) -> FlagConfig:
    """FlagConfig from the command line's options (`curate flag`, `curate run`); `max_off_class=None` keeps
    FlagConfig's own default, so that default lives in one place."""
    config = FlagConfig(scene=scene, retrain_pruned=retrain_pruned, pretrained=pretrained)
    if max_off_class is not None:
        config.max_off_class_fraction = max_off_class
    return config


# ---------------------------------------------------------------- scoring functions (pure, arrays in/out)

def l2_normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / (np.linalg.norm(x, axis=1, keepdims=True) + 1e-8)


def cleanlab_quality(labels: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(quality 0..1 per photo, boolean label-issue mask) from out-of-fold probabilities, by cleanlab."""
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    probs = _safe_probs(probs)
    quality = get_label_quality_scores(labels, probs, method="self_confidence")
    try:
        with warnings.catch_warnings():  # a class too small to judge: run_flag names it in its own warning
            warnings.filterwarnings("ignore", message="May not flag all label issues")
            issues = find_label_issues(labels, probs, filter_by="prune_by_noise_rate")
    except (ValueError, IndexError) as exc:  # tiny or degenerate data (a class never predicted)
        log.warning("cleanlab find_label_issues failed (%s); no cleanlab issue estimate", exc)
        issues = np.zeros(len(labels), dtype=bool)
    return np.asarray(quality, dtype=float), np.asarray(issues, dtype=bool)


def beats_chance(labels: np.ndarray, predicted: np.ndarray, p_value: float = 0.01) -> tuple[float, float, bool]:
    """(accuracy of `predicted`, the accuracy chance gives, whether the first beats the second at `p_value`).

    Chance: predictions that ignore the photo but answer each class as often as `predicted` does (the
    expected agreement of Cohen's kappa); one-sided z-test of the number right against it. Unlike a test
    against the largest class's share, it holds for imbalanced classes (95% good parts: a model that never
    says "defect" is at chance, one that catches some defects is not). A model at chance knows nothing of
    the classes, so its disagreement with a label is no evidence.
    """
    from scipy.stats import norm

    labels, predicted = np.asarray(labels, dtype=int), np.asarray(predicted, dtype=int)
    n = len(labels)
    if n == 0:
        return float("nan"), float("nan"), False
    k = int(max(labels.max(), predicted.max())) + 1
    per_class = np.bincount(labels, minlength=k).astype(float)
    answer_share = np.bincount(predicted, minlength=k) / n
    expected = float((per_class * answer_share).sum())
    variance = float((per_class * answer_share * (1 - answer_share)).sum())
    correct = float((labels == predicted).sum())
    better = variance > 0 and norm.sf((correct - expected) / np.sqrt(variance)) < p_value
    return correct / n, expected / n, bool(better)


def classes_learned(labels: np.ndarray, predicted: np.ndarray, n_classes: int, p_value: float = 0.01) -> np.ndarray:
    """Per class: whether `predicted` names it for its own photos more often than chance would.

    Chance for class c: answers that ignore the photo name c for a photo of c as often as they name c at all
    (one-sided exact binomial test at `p_value`). A model trained on a handful of photos of a rare class (8
    scratches among 570 parts) never answers it, so every photo of that class disagrees with its label, and
    that disagreement says nothing about the photo. `beats_chance` asks the same of all classes at once.
    """
    from scipy.stats import binom

    labels, predicted = np.asarray(labels, dtype=int), np.asarray(predicted, dtype=int)
    if len(labels) == 0:
        return np.zeros(n_classes, dtype=bool)
    answer_share = np.bincount(predicted, minlength=n_classes)[:n_classes] / len(labels)
    right, photos = answered_own_class(labels, predicted, n_classes)
    return binom.sf(right - 1, photos, answer_share) < p_value


def answered_own_class(labels: np.ndarray, predicted: np.ndarray, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Per class: (photos of it that `predicted` names it for, photos of it)."""
    labels, predicted = np.asarray(labels, dtype=int), np.asarray(predicted, dtype=int)
    photos = np.bincount(labels, minlength=n_classes)[:n_classes]
    right = np.bincount(labels[labels == predicted], minlength=n_classes)[:n_classes]
    return right, photos


def _safe_probs(probs: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(probs, dtype=float), 1e-6, None)
    return p / p.sum(axis=1, keepdims=True)


def knn_neighbours(emb: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices and cosine similarities of each row's k nearest other rows."""
    from sklearn.neighbors import NearestNeighbors

    z = l2_normalise(emb)
    k = min(k, len(z) - 1)
    nn = NearestNeighbors(n_neighbors=k + 1, metric="cosine").fit(z)
    dist, idx = nn.kneighbors(z)
    # drop self (the first neighbour unless exact duplicates tie)
    keep = idx != np.arange(len(z))[:, None]
    idx = np.array([row[m][:k] for row, m in zip(idx, keep, strict=True)])
    sim = np.array([1 - row[m][:k] for row, m in zip(dist, keep, strict=True)])
    return idx, sim


def knn_label_probs(emb: np.ndarray, labels: np.ndarray, n_classes: int, k: int) -> np.ndarray:
    """Similarity-weighted class distribution of each photo's k nearest neighbours (never itself)."""
    idx, sim = knn_neighbours(emb, k)
    w = np.clip(sim, 0, None) + 1e-3
    probs = np.zeros((len(labels), n_classes))
    for c in range(n_classes):
        probs[:, c] = (w * (labels[idx] == c)).sum(1)
    probs += 0.1  # a little smoothing so cleanlab never sees hard zeros
    return probs / probs.sum(1, keepdims=True)


def knn_quality(emb: np.ndarray, labels: np.ndarray, n_classes: int, k: int) -> np.ndarray:
    """Share (similarity-weighted) of a photo's neighbours that carry its label: 0..1."""
    probs = knn_label_probs(emb, labels, n_classes, k)
    return probs[np.arange(len(labels)), labels]


def cluster_quality(emb: np.ndarray, labels: np.ndarray, n_classes: int, cluster_size: int = 25,
                    seed: int = 0) -> tuple[np.ndarray, np.ndarray, pd.DataFrame]:
    """Cluster each class; score each cluster by size and by how far its centre is from the class's mass.

    Returns (quality per photo 0..1, cluster id within its class per photo, one row per cluster with
    label index, cluster, size, score). A cluster's raw score is its centre's cosine similarity to the
    class centre (the mean of the class's other clusters, weighted by size) minus its similarity to the
    nearest other class centre, shrunk towards the class's typical value for small-sample noise and
    weighted by the cluster's share of the class. Low = a small group that looks unlike its class.
    """
    from sklearn.cluster import KMeans

    z = l2_normalise(emb)
    centres = np.stack([z[labels == c].mean(0) if (labels == c).any() else np.zeros(z.shape[1])
                        for c in range(n_classes)])
    centres = l2_normalise(centres)
    cluster_id = np.zeros(len(z), dtype=int)
    per_photo = np.zeros(len(z))
    rows = []
    for c in range(n_classes):
        members = np.flatnonzero(labels == c)
        if len(members) == 0:
            continue
        k = int(np.clip(round(len(members) / cluster_size), 1, len(members)))
        if k > 1:
            km = KMeans(n_clusters=k, n_init=3, random_state=seed).fit(z[members])
            assign = km.labels_
        else:
            assign = np.zeros(len(members), dtype=int)
        sizes = np.bincount(assign, minlength=k)
        cents = l2_normalise(np.stack([z[members][assign == j].mean(0) for j in range(k)]))
        others = [o for o in range(n_classes) if o != c and (labels == o).any()]
        for j in range(k):
            # the class's mass without this cluster, so a big off-class group cannot define "the class"
            rest = (sizes[:, None] * cents)[np.arange(k) != j].sum(0) if k > 1 else centres[c]
            rest = rest / (np.linalg.norm(rest) + 1e-8)
            own = float(cents[j] @ rest)
            other = max((float(cents[j] @ centres[o]) for o in others), default=0.0)
            share = sizes[j] / len(members)
            raw = own - 0.5 * other + 0.5 * np.log(share * k)  # share*k = 1 for an average-size cluster
            rows.append({"label_index": c, "cluster": j, "size": int(sizes[j]), "raw": raw})
            idx = members[assign == j]
            cluster_id[idx] = j
            per_photo[idx] = raw
    table = pd.DataFrame(rows, columns=["label_index", "cluster", "size", "raw"])
    table["score"] = table["raw"].rank(pct=True)
    return percentile_rank(per_photo), cluster_id, table


def typicality_quality(emb: np.ndarray, labels: np.ndarray, k: int, share: float = 1.0) -> np.ndarray:
    """Mean cosine similarity of each photo to its k most similar photos with the same label (low = unlike
    the rest of its folder), k at most `share` of the class's photos (at least 1). A photo alone in its class
    gets the median of the others (nothing to compare).

    Why the share: the k most similar photos of a big class are close; in a class of 45 they are most of the
    class, so all its photos looked atypical beside a class of 500 and were all flagged. With k a fixed share
    of the class each photo is compared with the same part of its class's spread, whatever its size."""
    out = np.full(len(labels), np.nan)
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        if len(members) >= 2:
            k_class = max(1, min(k, round(share * len(members))))
            out[members] = knn_neighbours(emb[members], k_class)[1].mean(1)
    return np.where(np.isnan(out), np.nanmedian(out) if (~np.isnan(out)).any() else 0.0, out)


def lookalike_quality(features: np.ndarray, labels: np.ndarray, quality: np.ndarray, k: int) -> np.ndarray:
    """Mean `quality` of each photo's k most similar photos (cosine on `features`) with the same label.

    A photo alone in its class keeps its own quality.
    """
    quality = np.asarray(quality, dtype=float)
    out = quality.copy()
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        if len(members) < 2:
            continue
        idx, _ = knn_neighbours(features[members], k)
        out[members] = quality[members][idx].mean(1)
    return out


def with_lookalikes(own: np.ndarray, features: np.ndarray, labels: np.ndarray,
                    cfg: FlagConfig) -> tuple[np.ndarray, np.ndarray]:
    """(label_quality, lookalike_quality): the photo's own score blended with the mean own score of its
    `cfg.lookalikes` closest same-folder look-alikes in `features`, by `cfg.lookalike_share`."""
    lookalike = lookalike_quality(features, labels, own, cfg.lookalikes)
    return (1 - cfg.lookalike_share) * own + cfg.lookalike_share * lookalike, lookalike


def sure_first(quality: np.ndarray, certainty: np.ndarray) -> np.ndarray:
    """`quality` with every photo of `certainty` > 0 moved below all others, the most certain lowest.

    The moved photos get quality (1 - certainty) x the lowest quality among the rest, so label_quality
    stays in 0..1 and the order among the rest is unchanged."""
    quality = np.asarray(quality, dtype=float)
    certainty = np.clip(np.asarray(certainty, dtype=float), 0.0, 1.0)
    sure = certainty > 0
    if not sure.any() or sure.all():
        return quality
    return np.where(sure, (1 - certainty) * quality[~sure].min(), quality)


def centre_distance_z(emb: np.ndarray, labels: np.ndarray, n_classes: int) -> np.ndarray:
    """Robust z-score of each photo's cosine distance to the nearest class centre (high = unlike all)."""
    z = l2_normalise(emb)
    centres = l2_normalise(np.stack([z[labels == c].mean(0) for c in range(n_classes) if (labels == c).any()]))
    d = 1 - (z @ centres.T).max(1)
    med = np.median(d)
    mad = np.median(np.abs(d - med)) * 1.4826 + 1e-8
    return (d - med) / mad


def percentile_rank(x: np.ndarray) -> np.ndarray:
    """Ranks scaled to (0, 1]; ties share their mean rank."""
    return pd.Series(np.asarray(x, dtype=float)).rank(pct=True, method="average").to_numpy()


# the components that read the models' disagreement with a photo's label: they say nothing of the photos of a
# class the models did not learn (`classes_learned`), whose label_quality leaves them out
DISAGREEMENT = ("q_cleanlab", "q_knn", "q_confidence")


def big_enough_to_rank(photos: np.ndarray, cfg: FlagConfig) -> np.ndarray:
    """Per class (`photos`: its photo count): whether a class the models did not learn has photos enough to be
    ranked by the components that do not read their disagreement (`score`); a smaller one is not flagged."""
    return np.asarray(photos) > cfg.typical_k


def combine(components: dict[str, np.ndarray], weights: dict[str, float]) -> np.ndarray:
    """Weighted mean of percentile ranks -> label_quality in 0..1 (low = suspicious)."""
    total = np.zeros(len(next(iter(components.values()))))
    wsum = 0.0
    for name, q in components.items():
        w = weights.get(name, 0.0)
        if w:
            total += w * percentile_rank(q)
            wsum += w
    if not wsum:
        raise CurateError("label_quality: every component has weight 0")
    return total / wsum


# ---------------------------------------------------------------- the stage

def score(embeddings: np.ndarray, labels: np.ndarray, n_classes: int, oof_probs: dict[str, np.ndarray],
          cfg: FlagConfig, space: np.ndarray | None = None, extra: dict[str, np.ndarray] | None = None,
          lookalike_space: np.ndarray | None = None, certainty: np.ndarray | None = None) -> dict:
    """All per-photo scores from embeddings and out-of-fold probabilities of one or more models.

    `oof_probs` maps a model name to N x C probabilities; with none, kNN class distributions stand in
    (they are out-of-sample too: a photo is never its own neighbour). `space` says which rows share an
    embedding space (the K-fold ViT gives each fold's held-out photos its own model's embeddings, which
    are not comparable across folds): kNN and clusters are computed within each space. `extra`: more
    components (name -> quality, low = suspicious) to combine, e.g. `q_features` from a second
    representation. With trained models, `q_confidence` (their highest class probability) is added: low
    when the photo looks like none of the classes. `lookalike_space`: the features in which look-alikes
    are found (one space for all rows; default `embeddings` when `space` is uniform); with
    `cfg.lookalikes` 0, or no common space, label_quality is the photo's own score. `certainty`: photos
    above 0 (e.g. a confidently found face) are ranked first, the most certain lowest (`sure_first`).
    """
    n = len(labels)
    space = np.zeros(n, dtype=int) if space is None else np.asarray(space)
    knn_probs = np.zeros((n, n_classes))
    q_cluster = np.zeros(n)
    cluster_id = np.zeros(n, dtype=int)
    centre_z = np.zeros(n)
    tables = []
    offsets = np.zeros(n_classes, dtype=int)
    for sp in np.unique(space):
        rows = np.flatnonzero(space == sp)
        e, y = embeddings[rows], labels[rows]
        knn_probs[rows] = knn_label_probs(e, y, n_classes, cfg.knn_k)
        q, cid, table = cluster_quality(e, y, n_classes, cfg.cluster_size, cfg.seed)
        q_cluster[rows] = q
        cluster_id[rows] = cid + offsets[y]  # ids stay unique within a class across spaces
        if len(table):
            table["cluster"] += offsets[table["label_index"].to_numpy()]
            tables.append(table)
            offsets += np.bincount(table["label_index"], minlength=n_classes)
        centre_z[rows] = centre_distance_z(e, y, n_classes)
    clusters = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame(
        columns=["label_index", "cluster", "size", "raw", "score"])
    clusters["score"] = clusters["raw"].rank(pct=True)
    probs_by_model = dict(oof_probs) if oof_probs else {"knn": knn_probs}
    mean_probs = np.mean([_safe_probs(p) for p in probs_by_model.values()], axis=0)
    q_cleanlab, issues = cleanlab_quality(labels, mean_probs)
    q_knn = knn_probs[np.arange(n), labels]
    components = {"q_cleanlab": q_cleanlab, "q_knn": q_knn, "q_cluster": q_cluster}
    if oof_probs:
        components["q_confidence"] = mean_probs.max(1)
    components.update(extra or {})
    p_value = 0.01 if cfg.chance_p_value is None else cfg.chance_p_value
    answers = mean_probs.argmax(1)
    accuracy, chance, informative = beats_chance(labels, answers, p_value)
    informative = informative or cfg.chance_p_value is None  # None: flag whatever the models know
    learned = classes_learned(labels, answers, n_classes, p_value) | (cfg.chance_p_value is None)
    own = combine(components, cfg.weights)
    label_free = {name: q for name, q in components.items() if name not in DISAGREEMENT}
    # a model that did not learn a class disagrees with each of its photos' labels, which says nothing of the
    # photo: those photos are ranked by the other components alone, on the same percentile scale, where the class
    # has more than typical_k photos (in a smaller one the within-class measures have too few photos to say what
    # is typical of it: 3 real tulip photos among 60 others ranked lowest, and all were flagged). Measured on
    # 748 photos of flower_photos, full mode: the 48-px ViT learned neither roses nor tulips (38% right);
    # before, none of their photos was flagged, and the flag's precision and recall were 0.07 and 0.20
    ranked = learned
    if any(cfg.weights.get(name, 0.0) for name in label_free):
        ranked = learned | big_enough_to_rank(np.bincount(labels, minlength=n_classes)[:n_classes], cfg)
    rank_label_free = (ranked & ~learned)[labels]
    if rank_label_free.any():
        own = np.where(rank_label_free, combine(label_free, cfg.weights), own)
    if lookalike_space is None and len(np.unique(space)) == 1:
        lookalike_space = embeddings
    if cfg.lookalikes and lookalike_space is not None:
        quality, lookalike = with_lookalikes(own, lookalike_space, labels, cfg)
    else:
        lookalike, quality = own, own
    if not informative:
        # The models know nothing of the classes, so their disagreement with a label ranks nothing. What is
        # left is how unlike every class a photo looks (a foreign part, an empty fixture): distance to the
        # nearest class centre. Measured on 147 12-bit inspection shots with 3 flower photos filed as `good`:
        # the flowers rank 1-3 by it, 43, 66 and 94 by the combined score.
        quality = 1.0 - percentile_rank(centre_z)
    if certainty is not None:
        quality = sure_first(quality, certainty)
    preds = {name: p.argmax(1) for name, p in probs_by_model.items()}
    disagreeing = np.sum([pr != labels for pr in preds.values()], axis=0)
    return {"labels": labels, "label_quality": quality, "lookalike_quality": lookalike, **components,
            "issues": issues, "mean_probs": mean_probs, "cluster": cluster_id, "clusters": clusters, "preds": preds,
            "models_disagreeing": disagreeing, "centre_z": centre_z,
            "chance": {"accuracy": accuracy, "chance_accuracy": chance, "beats_chance": informative,
                       "classes_learned": learned, "classes_ranked": ranked}}


def choose_flags(s: dict, cfg: FlagConfig, max_fraction: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(off_class mask, outlier mask) from the score distribution.

    off_class: the n lowest label_quality photos, n = the number of label issues cleanlab estimates
    (capped at `max_fraction` of the photos, default `cfg.max_off_class_fraction`), or none when the
    out-of-fold models agree with the labels no better than chance (`beats_chance`): cleanlab's estimate
    then counts the models' guesses. Among the photos of a class the models did not learn
    (`classes_learned`) it counts their guesses too, so n is the share it estimates among the photos of the
    classes they learned, times the photos that can be flagged: those of a learned class, and those of an
    unlearned class ranked without the models' disagreement (`score`: "classes_ranked"). The photos of an
    unlearned class too small for that are not flagged. outlier: photos whose distance to the nearest class
    centre is an extreme robust z-score.
    """
    quality = s["label_quality"]
    cap = cfg.max_off_class_fraction if max_fraction is None else max_fraction
    judged = s["chance"]["classes_learned"][s["labels"]]
    flaggable = s["chance"]["classes_ranked"][s["labels"]]
    n = 0
    if s["chance"]["beats_chance"] and judged.any():
        # in whole photos: with every class learned, n is cleanlab's count itself
        n = min(int((s["issues"] & judged).sum()) * int(flaggable.sum()) // int(judged.sum()),
                int(cap * len(quality)))
    off = np.zeros(len(quality), dtype=bool)
    if n:
        order = np.argsort(quality, kind="stable")
        off[order[flaggable[order]][:n]] = True
    outlier = s["centre_z"] > cfg.outlier_z
    return off, outlier


def flag(run: str | Path | None, folds: int = 5, embeddings: str | None = None, fast: bool = False,
         progress: bool = True, config: FlagConfig | None = None) -> Path:
    """Score the run's manifest; write manifest.csv (flag columns), oof_<model>.npy, embeddings.npy, clusters.csv
    and, with the pretrained network, embeddings_pretrained.npy (its last convolution's features).

    `embeddings`: None (own ViT K-fold; cheap features with `fast`), 'vit', 'features', or 'keras:<Name>'.
    Returns the run folder.
    """
    from curate import embed

    cfg = dataclasses.replace(config or FlagConfig(), folds=folds)  # the caller's config is left as it was
    if folds < 2:
        raise CurateError(f"--folds {folds}: need at least 2 folds")
    for name in ("max_off_class_fraction", "max_pruned_fraction"):
        if not 0 <= getattr(cfg, name) <= 1:
            raise CurateError(f"{name} = {getattr(cfg, name)}: expected a share of the photos, 0 to 1")
    run_dir = resolve_run_dir(run)
    kind = embeddings or ("features" if fast else "vit")
    if fast and kind != "features":
        raise CurateError(f"--fast uses the cheap features; drop --embeddings {kind} or --fast")
    if not (kind in ("vit", "features") or kind.startswith("keras:")):
        raise CurateError(f"--embeddings {kind}: expected 'vit', 'features' or 'keras:<Name>'")
    with run_lock(run_dir, "flag"):
        t0 = time.time()
        df = read_manifest(run_dir / "manifest.csv")
        data_root = data_root_of(run_dir)
        ok = (df["error"].fillna("") == "").to_numpy() if "error" in df.columns else np.ones(len(df), bool)
        good = df[ok].reset_index(drop=True)
        if good["label"].nunique() < 2:
            raise CurateError(f"{run_dir}/manifest.csv: need at least 2 classes with readable photos to flag")
        classes = embed.class_names(good["label"])
        labels = good["label"].map({c: i for i, c in enumerate(classes)}).to_numpy()
        counts = np.bincount(labels, minlength=len(classes))
        small = [f"{c!r} ({n})" for c, n in zip(classes, counts, strict=True) if n < MIN_CLASS_PHOTOS]
        if small:
            log.warning("flag: too few readable photos to learn what a class looks like in %s; their photos' "
                        "label_quality says little (each class needs at least %d)", ", ".join(small),
                        MIN_CLASS_PHOTOS)
        rep = embed.represent(kind, run_dir, data_root, good, classes, cfg, progress=progress)
        extra = {}
        feats = rep
        if rep.name != "features":
            # a second, independent representation: within-class clusters of the cheap features (seconds)
            feats = embed.represent("features", run_dir, data_root, good, classes, cfg, progress=progress)
            extra["q_features"] = cluster_quality(feats.embeddings, labels, len(classes), cfg.cluster_size,
                                                  cfg.seed)[0]
        scene_measures = certainty = None
        if cfg.scene:
            from curate import scene

            scene_measures = scene.measure(run_dir, data_root, good, progress=progress)
            extra.update(scene.scene_quality(scene_measures, labels))
            of_people = scene.classes_of_people(scene_measures, labels)
            if of_people.any():
                share = scene.people_share(scene_measures, labels)
                log.info("flag: a face or a person is found in %s: people are taken to be what such a class is "
                         "about, and finding one is not counted against its photos",
                         ", ".join(f"{100 * share[c]:.0f}% of the {classes[c]!r} photos"
                                   for c in np.flatnonzero(of_people)))
            if cfg.sure_face is not None:
                certainty = scene.detected(scene_measures["face_score"], cfg.sure_face) * ~of_people[labels]
        # look-alikes by the cheap features: bench/flag_eval.py measured them better for this than the ViT's
        # embeddings (AP 0.46 vs 0.41), which are not comparable across folds anyway; better still by the
        # pretrained network's last convolution; its bottleneck says how like the rest of its folder a photo
        # looks (bench/flag_eval.py, --fast: AP 0.750 so, 0.731 with both from the last convolution, 0.728
        # with both from the bottleneck)
        lookalike_space = feats.embeddings
        if cfg.pretrained:
            from curate import pretrained

            general = pretrained.embeddings(run_dir, data_root, good, progress=progress)
            lookalike_space = pretrained.last_conv_features(general)
            extra["q_typical"] = typicality_quality(pretrained.bottleneck_features(general), labels,
                                                    cfg.typical_k, cfg.typical_share)
        score_cfg = dataclasses.replace(cfg, weights=cfg.fast_weights) if rep.name == "features" else cfg

        def score_with(rep) -> dict:
            oof = {rep.name: rep.oof_probs} if rep.oof_probs is not None else {}
            return score(rep.embeddings, labels, len(classes), oof, score_cfg, space=rep.space, extra=extra,
                         lookalike_space=lookalike_space, certainty=certainty)

        s = score_with(rep)
        if rep.name == "vit" and cfg.retrain_pruned:
            pruned, _ = choose_flags(s, cfg, cfg.max_pruned_fraction)
            if pruned.any():
                log.info("flag: training the %d-fold ViT again without the %d lowest-quality photos",
                         cfg.folds, pruned.sum())
                rep = embed.vit_kfold(run_dir, data_root, good, classes, cfg, progress=progress,
                                      recipe=cfg.vit, exclude=pruned)
                s = score_with(rep)
        if cfg.pretrained:
            s["pretrained_embeddings"] = lookalike_space
        off, outlier = choose_flags(s, cfg)
        if not s["chance"]["beats_chance"]:
            log.warning("flag: the %s model agrees with the folder labels on %.0f%% of the photos, no better than "
                        "chance (%.0f%% for answers that ignore the photo, as often per class): its disagreement "
                        "says nothing, so no photo is flagged off_class; label_quality ranks the photos by how "
                        "unlike every class they look (distance to the nearest class centre) instead",
                        rep.name, 100 * s["chance"]["accuracy"], 100 * s["chance"]["chance_accuracy"])
        elif not s["chance"]["classes_learned"].all():
            right, photos = answered_own_class(labels, s["mean_probs"].argmax(1), len(classes))
            learned, ranked = s["chance"]["classes_learned"], s["chance"]["classes_ranked"]
            for which, how in ((ranked & ~learned, f"so their photos are ranked without it ({', '.join(DISAGREEMENT)} "
                                                   "left out)"),
                               (~ranked, f"and too few photos (at most {cfg.typical_k}) to rank them by the other "
                                         "measures, so none of them is flagged off_class (nor left out of the "
                                         "retrain)")):
                if which.any():
                    unlearned = [f"{classes[c]!r} ({right[c]} of {photos[c]} photos answered as such)"
                                 for c in np.flatnonzero(which)]
                    log.warning("flag: the %s model did not learn %s beyond chance: its disagreement with those "
                                "labels says nothing, %s", rep.name, ", ".join(unlearned), how)
        if scene_measures is not None:
            s["scene"] = scene_measures
        _write_outputs(run_dir, df, ok, good, classes, labels, rep, s, off, outlier)
        log.info("flag: %d photos scored with %s in %.0f s; %d off_class, %d outlier -> %s",
                 len(good), rep.name, time.time() - t0, off.sum(), outlier.sum(), run_dir)
    return run_dir


def _write_outputs(run_dir: Path, df: pd.DataFrame, ok: np.ndarray, good: pd.DataFrame, classes: list[str],
                   labels: np.ndarray, rep, s: dict, off: np.ndarray, outlier: np.ndarray) -> None:
    n_all = len(df)

    def full(values: np.ndarray, fill=np.nan) -> np.ndarray:
        out = np.full((n_all,) + values.shape[1:], fill, dtype=values.dtype if values.dtype != int else float)
        out[ok] = values
        return out

    out = df.copy()
    # flag owns the q_* and pred_* columns, and replaces what an earlier version of it wrote
    old = [c for c in out.columns if c in FLAG_COLUMNS or c in RETIRED_COLUMNS or c.startswith(("pred_", "q_"))]
    out = out.drop(columns=old)
    for col in ["label_quality", "lookalike_quality"] + [c for c in s if c.startswith("q_")]:
        out[col] = full(np.round(s[col], 5).astype(float))
    if "scene" in s:
        for col in SCENE_COLUMNS:
            out[col] = full(np.round(s["scene"][col].to_numpy(dtype=float), 5))
    suggested = np.array(classes, dtype=object)[s["mean_probs"].argmax(1)]
    out["suggested_label"] = ""
    out.loc[ok, "suggested_label"] = suggested
    out["cluster"] = pd.array(full(s["cluster"].astype(float)), dtype="Int64")
    out["models_disagreeing"] = pd.array(full(s["models_disagreeing"].astype(float)), dtype="Int64")
    for name, pred in s["preds"].items():
        col = f"pred_{name}"
        out[col] = ""
        out.loc[ok, col] = np.array(classes, dtype=object)[pred]
    flags = out["flags"].fillna("").astype(str).to_numpy() if "flags" in out.columns else np.full(n_all, "")
    # a rerun replaces the flags this stage owns and keeps the scan's
    flags = np.array([";".join(f for f in str(c).split(";") if f and f not in ("off_class", "outlier"))
                      for c in flags], dtype=object)
    ok_idx = np.flatnonzero(ok)
    for i in ok_idx[off]:
        flags[i] = add_flag(flags[i], "off_class")
    for i in ok_idx[outlier]:
        flags[i] = add_flag(flags[i], "outlier")
    out["flags"] = flags

    model_name = rep.name
    if rep.oof_probs is not None:
        atomic_save_npy(run_dir / f"oof_{model_name}.npy", full(rep.oof_probs.astype(np.float32)))
    else:
        atomic_save_npy(run_dir / "oof_knn.npy", full(s["mean_probs"].astype(np.float32)))
    atomic_save_npy(run_dir / "embeddings.npy", full(rep.embeddings.astype(np.float32), 0.0))
    # one space for every photo (the K-fold ViT's embeddings are each fold's model's): the App's map uses it
    general = run_dir / "embeddings_pretrained.npy"
    if "pretrained_embeddings" in s:
        atomic_save_npy(general, full(s["pretrained_embeddings"].astype(np.float32), 0.0))
    else:
        general.unlink(missing_ok=True)  # from an earlier run with the pretrained network: no longer true
    atomic_write_csv(run_dir / "clusters.csv", _cluster_table(good, classes, labels, s))
    atomic_write_csv(run_dir / "manifest.csv", out)


def _cluster_table(good: pd.DataFrame, classes: list[str], labels: np.ndarray, s: dict,
                   examples: int = 5) -> pd.DataFrame:
    """One row per within-class cluster, most suspicious first, with its most suspicious example files.

    `score` is the cluster's own structure score (q_cluster: small and unlike its class); the order is by
    `mean_label_quality`, its members' mean final label_quality, because that carries every component:
    a reviewer who rejects whole clusters finds more off-class photos per photo looked at that way."""
    rows = []
    for r in s["clusters"].itertuples():
        members = np.flatnonzero((labels == r.label_index) & (s["cluster"] == r.cluster))
        members = members[np.argsort(s["label_quality"][members])]
        rows.append({"label": classes[r.label_index], "cluster": int(r.cluster), "size": int(r.size),
                     "score": round(float(r.score), 4),
                     "mean_label_quality": round(float(s["label_quality"][members].mean()), 4),
                     "examples": ";".join(good["filepath"].iloc[members[:examples]])})
    table = pd.DataFrame(rows, columns=["label", "cluster", "size", "score", "mean_label_quality", "examples"])
    return suspicious_clusters_first(table.sort_values(["label", "cluster"])).reset_index(drop=True)
