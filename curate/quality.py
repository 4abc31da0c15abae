"""Per-image quality measures (blur, brightness, contrast, entropy) and thresholds taken from the data.

Pure functions over pixel arrays and metric tables: this module never opens a file. Thresholds
for issues without a natural absolute cut (blur, brightness, information) follow cleanvision's idea:
an image is flagged when it is an outlier against the dataset's own distribution (a robust
z-score: median and MAD), and only if it is also past an absolute sanity bound, so a dataset of
uniformly good photos does not get its least-good tail flagged.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import pandas as pd

# The issues whose thresholds come from the data, the metric each reads and which tail is bad.
DATA_RELATIVE_ISSUES = {
    "blurry": ("blur", "low"),
    "dark": ("brightness", "low"),
    "bright": ("brightness", "high"),
    "low_information": ("entropy", "low"),
}

_LEVELS = np.arange(256, dtype=np.float64)
_MAD_TO_SIGMA = 1.4826  # MAD * this estimates the standard deviation of a normal distribution


@dataclass(frozen=True)
class QualityBounds:
    """How far into a tail an image must be to get a data-relative flag.

    `robust_k`: robust z-score (median +/- k * 1.4826 * MAD) beyond which a value is an outlier.
    The `*_abs` values are absolute limits a flagged value must also pass: an image is never
    `blurry` above `blurry_abs`, `dark` above `dark_abs`, `bright` below `bright_abs`, or
    `low_information` above `low_information_abs` (bits), whatever the rest of the data looks like.
    Blur is compared on a log scale because the variance of the Laplacian spans orders of magnitude.
    """

    robust_k: float = 3.0
    blurry_abs: float = 100.0
    dark_abs: float = 0.25
    bright_abs: float = 0.85
    low_information_abs: float = 4.0


def image_metrics(gray: np.ndarray, rgb: np.ndarray | None = None) -> dict[str, float]:
    """Quality measures of one image.

    In: `gray` a 2-D uint8 luminance array; `rgb` (optional) the H x W x 3 uint8 colour array.
    Out: `blur` (variance of the Laplacian: low = blurry), `brightness` and `contrast` (mean and
    standard deviation of luminance, 0..1), `entropy` (Shannon entropy of the luminance histogram,
    bits, 0..8: low = little information), `chroma` (mean absolute channel difference in grey
    levels, 0 for a grey image; NaN without `rgb`).
    """
    # cv2 rather than numpy for the per-pixel work: the scan calls this for every file
    _, lap_std = cv2.meanStdDev(cv2.Laplacian(gray, cv2.CV_16S))  # exact: |3x3 Laplacian of uint8| <= 1020
    blur = float(lap_std[0, 0]) ** 2
    hist = cv2.calcHist([gray], [0], None, [256], [0, 256]).ravel().astype(np.float64)
    n = hist.sum()
    mean = float(hist @ _LEVELS / n)
    std = float(np.sqrt(max(hist @ (_LEVELS - mean) ** 2 / n, 0.0)))
    p = hist[hist > 0] / n
    entropy = float(-(p * np.log2(p)).sum()) + 0.0  # + 0.0 turns -0.0 into 0.0
    chroma = float("nan")
    if rgb is not None:
        r, g, b = cv2.split(np.ascontiguousarray(rgb))
        chroma = (cv2.mean(cv2.absdiff(r, g))[0] + cv2.mean(cv2.absdiff(g, b))[0]) / 2
    return {"blur": blur, "brightness": mean / 255.0, "contrast": std / 255.0, "entropy": entropy, "chroma": chroma}


def _robust_bound(values: np.ndarray, tail: str, k: float) -> float:
    """median -/+ k robust standard deviations of `values` (NaNs ignored)."""
    values = values[np.isfinite(values)]
    if values.size == 0:
        return float("nan")
    med = float(np.median(values))
    mad = float(np.median(np.abs(values - med))) * _MAD_TO_SIGMA
    return med - k * mad if tail == "low" else med + k * mad


def data_thresholds(metrics: pd.DataFrame, bounds: QualityBounds) -> dict[str, dict[str, float]]:
    """The threshold each data-relative issue uses on this dataset.

    In: a table with columns `blur`, `brightness`, `entropy` (NaN where an image could not be read).
    Out: {issue: {"metric", "tail", "robust", "absolute", "threshold"}}: `robust` is the dataset's
    outlier bound, `absolute` the sanity bound, `threshold` the stricter of the two (the one applied).
    """
    abs_of = {"blurry": bounds.blurry_abs, "dark": bounds.dark_abs, "bright": bounds.bright_abs,
              "low_information": bounds.low_information_abs}
    out: dict[str, dict[str, float]] = {}
    for issue, (metric, tail) in DATA_RELATIVE_ISSUES.items():
        values = metrics[metric].to_numpy(dtype=np.float64)
        if metric == "blur":
            robust = float(np.expm1(_robust_bound(np.log1p(np.clip(values, 0, None)), tail, bounds.robust_k)))
        else:
            robust = _robust_bound(values, tail, bounds.robust_k)
        absolute = abs_of[issue]
        if np.isnan(robust):
            threshold = absolute
        else:
            threshold = min(robust, absolute) if tail == "low" else max(robust, absolute)
        out[issue] = {"metric": metric, "tail": tail, "robust": robust, "absolute": absolute, "threshold": threshold}
    return out


def data_relative_flags(metrics: pd.DataFrame, thresholds: dict[str, dict[str, float]]) -> dict[str, np.ndarray]:
    """{issue: boolean array}: which rows of `metrics` are past each issue's threshold."""
    out = {}
    for issue, t in thresholds.items():
        values = metrics[t["metric"]].to_numpy(dtype=np.float64)
        with np.errstate(invalid="ignore"):
            out[issue] = values < t["threshold"] if t["tail"] == "low" else values > t["threshold"]
    return out
