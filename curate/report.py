"""`curate report`: one page a person would rather look at than read, from whatever stages have run.

Writes into the run folder (`reports/<name>/`):
- `index.html`: self-contained (inline CSS, thumbnails and charts embedded as base64 images; the
  contact sheets of flagged photos are linked from the sibling `sheets/flag/` folder);
- `report.md`: the same numbers as text;
- `metrics.json`: the same numbers for machines.
Each section reads one stage's artifacts; a stage that has not run gets a line saying which
command adds it. The report computes nothing it could read, except the contact sheets of
flagged photos, which it draws (via `curate.preview`) when they are missing.
"""

from __future__ import annotations

import base64
import html
import io
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from curate.io import (
    CLUSTER_ORDER,
    atomic_write_json,
    atomic_write_text,
    flags_of,
    read_json,
    read_manifest,
    resolve_run_dir,
    run_lock,
    safe_relpath,
    suspicious_clusters_first,
)

log = logging.getLogger("curate.report")

THUMB_SIDE = 112
ISSUE_EXAMPLES = 6
MAX_DUP_GROUPS = 40
MAX_OFF_CLASS = 120
MAX_LOW_QUALITY_THUMBS = 24
ISSUE_TEXT = {
    "corrupt": "the file cannot be decoded",
    "truncated": "the file ends early",
    "not_image": "not an image at all",
    "exact_duplicate": "byte-identical copy of another photo",
    "near_duplicate": "visually the same photo (perceptual hash)",
    "cross_label_duplicate": "the same photo filed under two classes",
    "tiny": "too few pixels",
    "odd_aspect_ratio": "very wide or very tall",
    "blurry": "little fine detail (variance of Laplacian)",
    "dark": "very dark",
    "bright": "very bright / washed out",
    "low_information": "little variety of pixel values (low entropy)",
    "grayscale": "no colour",
    "off_class": "does not look like its class (model disagreement, clusters)",
    "outlier": "far from every photo of its class",
}


@dataclass
class RunArtifacts:
    """Everything the stages left in a run folder; None where a stage has not run."""

    run_dir: Path
    manifest: pd.DataFrame
    scan: dict | None = None
    duplicates: pd.DataFrame | None = None
    clusters: pd.DataFrame | None = None
    export: dict | None = None
    removed: pd.DataFrame | None = None
    compare: dict | None = None
    curves: dict[str, list[pd.DataFrame]] = field(default_factory=dict)
    data_root: Path | None = None

    @property
    def flagged(self) -> bool:
        return "label_quality" in self.manifest.columns

    @property
    def name(self) -> str:
        return self.run_dir.resolve().name


def _read_csv(path: Path) -> pd.DataFrame | None:
    if not path.exists():
        return None
    try:
        return pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        log.warning("%s: unreadable (%s); its section is left out", path, exc)
        return None


def _read_json(path: Path) -> dict | None:
    if not path.exists():
        return None
    try:
        return read_json(path)
    except (OSError, ValueError) as exc:
        log.warning("%s: unreadable (%s); its section is left out", path, exc)
        return None


def load_artifacts(run_dir: Path) -> RunArtifacts:
    """Read what each stage wrote into `run_dir` (missing files are None)."""
    manifest = read_manifest(run_dir / "manifest.csv")
    if "flags" not in manifest.columns:
        manifest["flags"] = ""
    art = RunArtifacts(run_dir=run_dir, manifest=manifest)
    art.scan = _read_json(run_dir / "scan.json")
    if art.scan and art.scan.get("data"):
        art.data_root = Path(art.scan["data"])
    art.duplicates = _read_csv(run_dir / "duplicates.csv")
    art.clusters = _read_csv(run_dir / "clusters.csv")
    art.export = _read_json(run_dir / "export.json")
    art.removed = _read_csv(run_dir / "removed.csv") if art.export else None
    art.compare = _read_json(run_dir / "compare.json")
    if art.compare:
        for variant in ("raw", "clean"):
            logs = []
            for run in art.compare.get("runs", []):
                path = Path(run["dir"]) / "log.csv"
                if run["variant"] == variant and path.exists():
                    logs.append(pd.read_csv(path).assign(seed=run["seed"]))
            art.curves[variant] = logs
    return art


# ---------------------------------------------------------------------------------------------
# Numbers (metrics.json; report.md and index.html show the same)


def issue_counts(manifest: pd.DataFrame) -> dict[str, int]:
    counts: dict[str, int] = {}
    for cell in manifest["flags"]:
        for f in flags_of(cell):
            counts[f] = counts.get(f, 0) + 1
    order = list(ISSUE_TEXT)
    return dict(sorted(counts.items(), key=lambda kv: (order.index(kv[0]) if kv[0] in order else len(order), kv[0])))


def build_metrics(art: RunArtifacts) -> dict[str, Any]:
    m = art.manifest
    out: dict[str, Any] = {
        "name": art.name,
        "data": str(art.data_root) if art.data_root else None,
        "photos": int(len(m)),
        "classes": {str(k): int(v) for k, v in m["label"].value_counts().sort_index().items()},
        "photos_flagged": int((m["flags"].fillna("") != "").sum()),
        "issues": issue_counts(m),
        "stages": {"scan": art.scan is not None, "flag": art.flagged,
                   "review": (art.run_dir / "fiftyone.json").exists(), "export": art.export is not None,
                   "compare": art.compare is not None},
    }
    if art.scan and "duplicate_groups" in art.scan:
        out["duplicate_groups"] = art.scan["duplicate_groups"]
    if art.flagged:
        out["off_class_candidates"] = int(m["flags"].map(lambda c: "off_class" in flags_of(c)).sum())
    if art.export:
        e = art.export
        out["export"] = {k: e.get(k) for k in ("policy", "kept", "removed", "relabelled", "removed_by_reason",
                                                "relabelled_to", "review_overrides", "low_quality_kept",
                                                "classes_after")}
    if art.compare:
        c = art.compare
        out["compare"] = {
            "preset": c.get("preset"), "epochs": c.get("epochs"), "seeds": c.get("seeds"),
            "test_photos": c["test"]["verified_test"], "test": c["test"],
            "accuracy_raw": c["raw"]["accuracy"], "accuracy_clean": c["clean"]["accuracy"],
            "macro_f1_raw": c["raw"]["macro_f1"], "macro_f1_clean": c["clean"]["macro_f1"],
            "difference": c["difference"], "difference_macro_f1": c.get("difference_macro_f1"),
            "per_class_f1": {k: {"raw": c["raw"]["per_class_f1"][k], "clean": c["clean"]["per_class_f1"][k]}
                             for k in c["classes"]},
        }
    return out


# ---------------------------------------------------------------------------------------------
# Images


class Thumbnails:
    """Small embedded JPEGs of photos, made once per file per report."""

    def __init__(self, data_root: Path | None, side: int = THUMB_SIDE):
        self.data_root, self.side, self._cache = data_root, side, {}

    def uri(self, filepath: str) -> str | None:
        if filepath in self._cache:
            return self._cache[filepath]
        from curate.preview import thumbnail

        uri = None
        if self.data_root is not None:
            try:
                im = thumbnail(safe_relpath(self.data_root, filepath), self.side)
            except Exception as exc:  # noqa: BLE001 -- a bad path in one row must not lose the whole report
                log.debug("%s: no thumbnail (%s)", filepath, exc)
                im = None
            if im is not None:
                buf = io.BytesIO()
                im.save(buf, format="JPEG", quality=72)
                uri = "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()
        self._cache[filepath] = uri
        return uri

    def img(self, filepath: str, caption: str = "", cls: str = "") -> str:
        uri = self.uri(filepath)
        title = html.escape(filepath)
        pic = (f'<img src="{uri}" alt="{title}" title="{title}" loading="eager">' if uri
               else f'<div class="nothumb" title="{title}">unreadable</div>')
        cap = f"<figcaption>{caption}</figcaption>" if caption else ""
        return f'<figure class="thumb {cls}">{pic}{cap}</figure>'


def _png_uri(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=96, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def chart_class_distribution(before: dict[str, int], after: dict[str, int] | None) -> str:
    plt = _pyplot()
    classes = sorted(set(before) | set(after or {}))
    x = np.arange(len(classes))
    fig, ax = plt.subplots(figsize=(6.4, 3.2))
    w = 0.4 if after else 0.6
    ax.bar(x - (w / 2 if after else 0), [before.get(c, 0) for c in classes], w, label="raw", color="#9aa5b1")
    if after:
        ax.bar(x + w / 2, [after.get(c, 0) for c in classes], w, label="cleaned", color="#2f7ed8")
    ax.set_xticks(x, classes)
    ax.set_ylabel("photos")
    ax.legend(frameon=False)
    ax.spines[["top", "right"]].set_visible(False)
    return _png_uri(fig)


def chart_accuracy(compare: dict) -> str:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.2, 3.4))
    for i, (variant, color) in enumerate((("raw", "#9aa5b1"), ("clean", "#2f7ed8"))):
        acc = compare[variant]["accuracy"]
        ax.bar(i, acc["mean"], 0.6, color=color, yerr=acc["sd"] or 0, capsize=8, label=variant)
        ax.scatter([i] * len(acc["per_seed"]), acc["per_seed"], color="black", s=14, zorder=3)
    ax.set_xticks([0, 1], ["raw", "cleaned"])
    lo = min(min(compare[v]["accuracy"]["per_seed"]) for v in ("raw", "clean"))
    ax.set_ylim(max(0.0, lo - 0.15), min(1.0, max(compare[v]["accuracy"]["mean"] for v in ("raw", "clean")) + 0.1))
    ax.set_ylabel("test accuracy (verified photos)")
    ax.set_title(f"mean +- sd over {len(compare['seeds'])} seed(s); dots = seeds", fontsize=9)
    ax.spines[["top", "right"]].set_visible(False)
    return _png_uri(fig)


def chart_curves(curves: dict[str, list[pd.DataFrame]]) -> str | None:
    if not any(curves.values()):
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    for variant, color in (("raw", "#7b8794"), ("clean", "#2f7ed8")):
        for k, df in enumerate(curves.get(variant, [])):
            epoch = df["epoch"] + 1 if "epoch" in df else np.arange(1, len(df) + 1)
            for ax, key in zip(axes, ("acc", "loss"), strict=True):
                lab = f"{variant} (validation)" if k == 0 else None
                if f"val_{key}" in df:
                    ax.plot(epoch, df[f"val_{key}"], color=color, lw=1.6, label=lab)
                if key in df:
                    ax.plot(epoch, df[key], color=color, lw=0.8, ls="--", alpha=0.7,
                            label=f"{variant} (train)" if k == 0 else None)
    for ax, name in zip(axes, ("accuracy", "loss"), strict=True):
        ax.set_xlabel("epoch")
        ax.set_ylabel(name)
        ax.spines[["top", "right"]].set_visible(False)
    axes[0].legend(frameon=False, fontsize=8)
    return _png_uri(fig)


def chart_confusion(matrix: list[list[int]], classes: list[str], title: str) -> str:
    plt = _pyplot()
    cm = np.asarray(matrix, dtype=float)
    rates = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(4.4, 3.8))
    ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    for i in range(len(classes)):
        for j in range(len(classes)):
            ax.text(j, i, f"{int(cm[i, j])}", ha="center", va="center", fontsize=8,
                    color="white" if rates[i, j] > 0.6 else "black")
    ax.set_xticks(range(len(classes)), classes, rotation=35, ha="right", fontsize=8)
    ax.set_yticks(range(len(classes)), classes, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=10)
    return _png_uri(fig)


# ---------------------------------------------------------------------------------------------
# HTML sections

CSS = """
body{font:15px/1.45 system-ui,-apple-system,'Segoe UI',sans-serif;margin:0;color:#1f2933;background:#f5f7fa}
main{max-width:1180px;margin:0 auto;padding:24px}
h1{font-size:26px;margin:0 0 4px}
h2{font-size:20px;margin:34px 0 10px;border-bottom:2px solid #d9e2ec;padding-bottom:4px}
h3{font-size:16px;margin:18px 0 6px}
.sub{color:#52606d;margin:0 0 18px}
.cards{display:flex;flex-wrap:wrap;gap:12px}
.card{background:#fff;border-radius:8px;padding:12px 16px;box-shadow:0 1px 3px rgba(0,0,0,.08);min-width:140px}
.card b{display:block;font-size:24px}.card span{color:#52606d;font-size:13px}
.good{color:#137333}.bad{color:#b3261e}
table{border-collapse:collapse;background:#fff;box-shadow:0 1px 3px rgba(0,0,0,.06);margin:8px 0;
  display:block;width:max-content;max-width:100%;overflow-x:auto}
th,td{padding:5px 10px;border-bottom:1px solid #e4e7eb;text-align:left;vertical-align:middle;font-size:14px}
th{background:#f0f4f8}td.n{text-align:right;font-variant-numeric:tabular-nums}
.strip{display:flex;flex-wrap:wrap;gap:6px}
figure.thumb{margin:0;background:#fff;border-radius:6px;padding:4px;box-shadow:0 1px 2px rgba(0,0,0,.1);
  width:112px;text-align:center}
figure.thumb img{max-width:112px;max-height:112px;display:block;margin:0 auto}
figure.thumb figcaption{font-size:11px;color:#52606d;overflow-wrap:anywhere}
figure.removed{outline:3px solid #e66;opacity:.8}figure.kept{outline:3px solid #3a9}
.nothumb{width:112px;height:84px;background:#cbd2d9;color:#52606d;font-size:12px;display:flex;
  align-items:center;justify-content:center}
.group{display:flex;gap:8px;align-items:flex-start;margin:8px 0;padding:8px;background:#fff;border-radius:8px}
.group .meta{width:150px;font-size:13px;color:#52606d}
.cross{border-left:5px solid #e66}
.missing{background:#fff8e1;border-left:4px solid #f0b429;padding:8px 12px}
.charts{display:flex;flex-wrap:wrap;gap:16px;align-items:flex-start}
.charts img{background:#fff;border-radius:8px;box-shadow:0 1px 3px rgba(0,0,0,.08)}
img.sheet{max-width:100%;border-radius:6px}
code{background:#e4e7eb;padding:1px 4px;border-radius:3px}
details summary{cursor:pointer;color:#2f7ed8}
#broken{display:none}
"""


def _missing(text: str, command: str) -> str:
    return f'<p class="missing">{html.escape(text)} Run <code>{html.escape(command)}</code>.</p>'


def _fmt_stat(stat: dict) -> str:
    return f"{stat['mean']:.3f}" + (f" ± {stat['sd']:.3f}" if stat.get("sd") is not None else "")


def _fmt_mean(d: dict | None) -> str:
    return f"{d['mean']:+.3f}" if d else "–"


def _fmt_ci(ci: list[float] | None) -> str:
    return f"[{ci[0]:+.3f}, {ci[1]:+.3f}]" if ci else "n/a (one seed)"


def _judged(d: dict) -> int:
    """+1 if the whole 95% interval is above zero, -1 if below, 0 if it includes zero (over seeds; over test
    photos when there is one seed)."""
    ci = d.get("ci95_seeds") or d.get("ci95_bootstrap")
    if not ci or ci[0] <= 0 <= ci[1]:
        return 0
    return 1 if ci[0] > 0 else -1


def _movement(metric: str, d: dict) -> str:
    points, sign = abs(d["mean"]) * 100, _judged(d)
    if sign > 0:
        return f"{metric} rose {points:.1f} points (the whole 95% interval above zero)"
    if sign < 0:
        return f"{metric} fell {points:.1f} points (the whole 95% interval below zero)"
    return f"{metric} shows no clear difference ({d['mean'] * 100:+.1f} points; the 95% interval includes zero)"


REVIEW_ADVICE = ("Treat the off-class candidates as a review list -- tag them reject or keep in the App (`curate app`) "
                 "before exporting -- or export with a gentler policy (`curate export --policy list`).")


def compare_verdict(compare: dict) -> str:
    """What cleaning bought, in a sentence or three: helped, cost, or no clear difference, judged by the 95%
    interval over seeds (over test photos when there is one seed), for accuracy and for macro-F1.

    Macro-F1 weighs every class equally; when the two disagree (imbalanced classes: a cleaning that helps the
    big classes and costs a rare one) the verdict says so instead of trusting accuracy alone. When neither
    training beat chance on the test photos (`beats_chance` in compare.json), there is no verdict.
    """
    d = compare["difference"]
    f1 = compare.get("difference_macro_f1")  # absent in compare.json files written before it existed
    if compare.get("raw", {}).get("beats_chance") is False and compare.get("clean", {}).get("beats_chance") is False:
        t = compare["test"]
        return (f"No verdict: neither training did better than chance on the {t['verified_test']} verified test photos "
                f"(answers that ignore the photo; always '{t['largest_class']}' alone scores "
                f"{t['largest_class_share']:.3f}), so the comparison says nothing about the cleaning. Train longer or "
                "larger (`--epochs`, `--preset cpu`), or add photos of the small classes.")
    acc_sign = _judged(d)
    points = abs(d["mean"]) * 100
    if f1 is None or _judged(f1) == acc_sign:
        agrees = f" Macro-F1 agrees ({f1['mean'] * 100:+.1f} points)." if f1 is not None else ""
        if acc_sign == 0:
            return (f"No clear difference ({d['mean'] * 100:+.1f} points; the 95% interval includes zero): this "
                    f"cleaning neither helped nor hurt measurably.{agrees}")
        if acc_sign > 0:
            return f"Cleaning helped: +{points:.1f} points of accuracy, the whole 95% interval above zero.{agrees}"
        return (f"Cleaning cost {points:.1f} points of accuracy (the whole 95% interval below zero): the policy "
                f"removed photos the model learned from.{agrees} {REVIEW_ADVICE}")
    f1_sign = _judged(f1)
    text = (f"Mixed result: {_movement('accuracy', d)}, while {_movement('macro-F1', f1)}. Macro-F1 weighs every "
            "class equally, so ")
    if f1_sign < 0:
        return text + (f"the cleaning cost a class that accuracy hides (see F1 per class). {REVIEW_ADVICE}")
    if f1_sign > 0:
        return text + "the cleaning helped a class that accuracy underweights (see F1 per class)."
    return text + ("the gain is in the big classes; check F1 per class before trusting it." if acc_sign > 0 else
                   f"the loss is in the big classes (see F1 per class). {REVIEW_ADVICE}")


def section_summary(art: RunArtifacts, metrics: dict) -> str:
    cards = [(f"{metrics['photos']:,}", "photos"), (str(len(metrics["classes"])), "classes"),
             (f"{metrics['photos_flagged']:,}", "photos with an issue")]
    if art.export:
        cards.append((f"{art.export['removed']:,}", f"removed by policy '{art.export['policy']}'"))
        if art.export.get("relabelled"):
            cards.append((f"{art.export['relabelled']:,}", "relabelled"))
    if art.compare:
        c = art.compare
        d = c["difference"]["mean"]
        cls = "good" if d > 0 else "bad" if d < 0 else ""
        cards.append((f"{c['raw']['accuracy']['mean']:.1%} → {c['clean']['accuracy']['mean']:.1%}",
                      "test accuracy raw → cleaned"))
        cards.append((f'<span class="{cls}">{d:+.1%}</span>', "accuracy gained by cleaning"))
    body = "".join(f'<div class="card"><b>{v}</b><span>{html.escape(k)}</span></div>' for v, k in cards)
    stages = metrics["stages"]
    commands = {"scan": "curate scan DATA", "flag": "curate flag", "review": "curate app",
                "export": "curate export", "compare": "curate compare --raw ... --clean ..."}
    status = " · ".join(f"{s} {'✔' if done else '—'}" for s, done in stages.items())
    todo = [f"<code>{commands[s]}</code>" for s, done in stages.items() if not done]
    todo_html = f" Not run yet: {', '.join(todo)}." if todo else ""
    return f'<div class="cards">{body}</div><p class="sub">Stages: {status}.{todo_html}</p>'


def section_issues(art: RunArtifacts, thumbs: Thumbnails, counts: dict[str, int]) -> str:
    if not counts:
        return "<p>No photo carries an issue flag.</p>"
    m = art.manifest
    q = pd.to_numeric(m["label_quality"], errors="coerce") if "label_quality" in m else pd.Series(1.0, index=m.index)
    rows = []
    for name, n in counts.items():
        has = m["flags"].map(lambda c, f=name: f in flags_of(c))
        examples = _spread(m[has].assign(_q=q[has]).sort_values(["_q", "filepath"]), ISSUE_EXAMPLES)
        strip = "".join(thumbs.img(fp, html.escape(lab)) for fp, lab in zip(examples["filepath"], examples["label"],
                                                                               strict=True))
        rows.append(f"<tr><td><b>{html.escape(name)}</b><br><small>{html.escape(ISSUE_TEXT.get(name, ''))}</small>"
                    f'</td><td class="n">{n}</td><td><div class="strip">{strip}</div></td></tr>')
    return "<table><tr><th>issue</th><th>photos</th><th>examples</th></tr>" + "".join(rows) + "</table>"


def _spread(rows: pd.DataFrame, n: int) -> pd.DataFrame:
    """The first `n` rows taking turns across classes, so examples are not all from one folder."""
    turn = rows.groupby("label", sort=False).cumcount()
    return rows.assign(_turn=turn.to_numpy()).sort_values("_turn", kind="stable").head(n)


def section_duplicates(art: RunArtifacts, thumbs: Thumbnails) -> str:
    dup = art.duplicates
    if dup is None:
        return _missing("No duplicates.csv in this run.", "curate scan DATA")
    thresholds = (art.scan or {}).get("thresholds", {})
    note = ""
    if thresholds.get("near_duplicates_grouped") is False:
        note = (f"<p><b>Near duplicates were not grouped:</b> {100 * thresholds.get('near_share', 0):.0f}% of the "
                "photos have a perceptual-hash neighbour, so the hash cannot tell this dataset's photos apart "
                "(one scene or fixture). Only byte-identical copies are listed.</p>")
    if dup.empty:
        return (note + "<p>No exact duplicate photos.</p>") if note else "<p>No exact or near-duplicate photos.</p>"
    removed = set(art.removed["filepath"]) if art.removed is not None else set()
    parts = []
    groups = list(dup.groupby("dup_group", sort=False))
    # cross-label groups first: they are the ones that teach the model two answers for one photo
    groups.sort(key=lambda g: (g[1]["label"].nunique() == 1, int(g[0]) if str(g[0]).isdigit() else 1 << 62, g[0]))
    for gid, g in groups[:MAX_DUP_GROUPS]:
        cross = g["label"].nunique() > 1
        figs = []
        for rec in g.itertuples(index=False):
            keep = str(rec.keep).lower() == "true"
            state = "removed" if rec.filepath in removed else ("kept" if art.removed is not None else "")
            cap = f"{html.escape(rec.label)} · {html.escape(rec.kind)} · d={html.escape(str(rec.distance))}" + (
                " · keep" if keep else "")
            figs.append(thumbs.img(rec.filepath, cap, state))
        kinds = ", ".join(sorted(set(g["kind"])))
        meta = f"group {html.escape(str(gid))}<br>{len(g)} photos, {html.escape(kinds)}" + (
            "<br><b>cross-label</b>" if cross else "")
        cls = "group cross" if cross else "group"
        parts.append(f'<div class="{cls}"><div class="meta">{meta}</div>{"".join(figs)}</div>')
    more = f"<p>… and {len(groups) - MAX_DUP_GROUPS} more groups in duplicates.csv.</p>" if len(
        groups) > MAX_DUP_GROUPS else ""
    legend = ("<p class='sub'>Outline: green = in cleaned.csv, red = removed by the export policy.</p>"
              if art.removed is not None else "")
    return note + legend + "".join(parts) + more


def _what_the_models_did_not_learn(m: pd.DataFrame, q: pd.Series) -> str:
    """Why the models' disagreement is left out: the out-of-fold models (their answers are `suggested_label`)
    agree with the labels no better than chance (no photo is flagged), or not for some classes (ranked without
    it, or, when small, not flagged); the flag stage judges the same way (labels.beats_chance,
    labels.classes_learned, labels.score)."""
    if "suggested_label" not in m.columns:
        return ""
    from curate.labels import FlagConfig, answered_own_class, beats_chance, big_enough_to_rank, classes_learned

    scored = m[q.notna() & (m["suggested_label"].fillna("") != "")]
    if not len(scored):
        return ""
    classes = sorted(set(scored["label"]) | set(scored["suggested_label"]))
    truth = scored["label"].map(classes.index).to_numpy()
    answers = scored["suggested_label"].map(classes.index).to_numpy()
    accuracy, chance, informative = beats_chance(truth, answers)
    if not informative:
        return (f" The models agree with the folder labels on {accuracy:.0%} of the photos, no better "
                f"than chance ({chance:.0%} for answers that ignore the photo), so their disagreement "
                "is no evidence (see the flag stage's warning); label_quality ranks the photos by how "
                "unlike every class they look instead (distance to the nearest class centre).")
    learned = classes_learned(truth, answers, len(classes))
    right, photos = answered_own_class(truth, answers, len(classes))
    small = ~big_enough_to_rank(photos, FlagConfig())  # as the flag stage judges (labels.score)
    text = ""
    for which, how in ((~small, "so those photos are ranked without it (the other measures alone)"),
                       (small, "and hold too few photos to rank them by the other measures, so none of them "
                               "is flagged")):
        unlearned = [f"<code>{html.escape(c)}</code> (answered for {right[i]} of its {photos[i]} photos)"
                     for i, c in enumerate(classes) if not learned[i] and photos[i] and which[i]]
        if unlearned:
            text += (f" The models did not learn {', '.join(unlearned)} beyond chance: that a model which never "
                     f"learned a class disagrees with its label says nothing of the photo, {how}.")
    return text


def section_off_class(art: RunArtifacts, thumbs: Thumbnails) -> str:
    if not art.flagged:
        return _missing("Label-quality scores and off-class flags come from the flag stage, which has not run.",
                        "curate flag")
    m = art.manifest
    q = pd.to_numeric(m["label_quality"], errors="coerce")
    off = m["flags"].map(lambda c: "off_class" in flags_of(c))
    if off.any():
        rows, intro = m[off], f"{int(off.sum())} photos flagged <code>off_class</code>, most suspicious first."
        intro += _what_the_models_did_not_learn(m, q)
    else:
        rows, intro = m.head(0), "No photo is flagged <code>off_class</code>." + _what_the_models_did_not_learn(m, q)
        lowest = m.assign(_q=q).sort_values("_q").head(20)
        if len(lowest):
            rows, intro = lowest, intro + " The 20 lowest label-quality scores, for a look:"
    rows = rows.assign(_q=q[rows.index]).sort_values(["_q", "filepath"])
    removed = art.removed.set_index("filepath")["reason"] if art.removed is not None else None
    score_cols = [c for c in ("label_quality", "lookalike_quality", "q_cleanlab", "q_knn", "q_cluster", "q_typical",
                                "face_score", "body_score", "straight_edges", "in_focus", "colourfulness", "foliage")
                  if c in m.columns]
    head = "".join(f"<th>{c}</th>" for c in ["photo", "file", "label", *score_cols, "suggested", "cluster", "export"])
    body = []
    for _, r in rows.head(MAX_OFF_CLASS).iterrows():
        scores = "".join(f'<td class="n">{_num(r[c])}</td>' for c in score_cols)
        decision = "—"
        if removed is not None:
            decision = html.escape(removed.get(r["filepath"], "kept"))
        sugg = r.get("suggested_label", "")
        sugg = "" if pd.isna(sugg) or sugg == r["label"] else sugg
        body.append(f"<tr><td>{thumbs.img(r['filepath'])}</td><td><small>{html.escape(r['filepath'])}</small></td>"
                    f"<td>{html.escape(str(r['label']))}</td>{scores}<td><b>{html.escape(str(sugg))}</b></td>"
                    f"<td>{html.escape(str(r.get('cluster', '')))}</td><td>{decision}</td></tr>")
    more = f"<p>… {len(rows) - MAX_OFF_CLASS} more in the manifest.</p>" if len(rows) > MAX_OFF_CLASS else ""
    table = f"<table><tr>{head}</tr>{''.join(body)}</table>" if body else ""
    legend = ("Scores: 0..1, low = suspicious; face_score and body_score (a face or a person found, 0..1), "
              "straight_edges, in_focus (share of the frame "
              "in focus), colourfulness and foliage (share of green pixels) are what the scene measures found.")
    return f"<p>{intro} {legend}</p>{table}{more}{section_clusters(art)}"


def _num(v) -> str:
    try:
        return f"{float(v):.3f}"
    except (TypeError, ValueError):
        return html.escape(str(v))


def section_clusters(art: RunArtifacts, rows: int = 15) -> str:
    """The most suspicious clusters of clusters.csv: lowest mean label_quality first (low = suspicious;
    files without that column fall back to the cluster's own structure score, also low = suspicious)."""
    c = art.clusters
    if c is None or c.empty or not set(CLUSTER_ORDER) & set(c.columns):
        return ""
    c = suspicious_clusters_first(c).head(rows)
    cols = [k for k in ("label", "cluster", "size", *CLUSTER_ORDER) if k in c.columns]
    numeric = set(CLUSTER_ORDER)
    head = "".join(f"<th>{k}</th>" for k in cols)
    body = "".join("<tr>" + "".join(f"<td>{_num(r[k]) if k in numeric else html.escape(str(r[k]))}</td>"
                                    for k in cols) + "</tr>" for _, r in c.iterrows())
    return (f"<h3>Most suspicious clusters (clusters.csv)</h3><p class='sub'>Lowest mean label_quality first. "
            f"A whole cluster can be rejected at once in the App.</p><table><tr>{head}</tr>{body}</table>")


def section_low_quality(art: RunArtifacts, thumbs: Thumbnails) -> str:
    from curate.io import LOW_QUALITY_FLAGS

    m = art.manifest
    low = m["flags"].map(lambda c: bool(set(LOW_QUALITY_FLAGS) & set(flags_of(c))))
    if not low.any():
        return "<p>No low-quality photos.</p>"
    rows = m[low]
    shown = _spread(rows, MAX_LOW_QUALITY_THUMBS)
    kept = set(rows["filepath"])
    if art.removed is not None:
        kept -= set(art.removed["filepath"])
    strip = "".join(thumbs.img(fp, html.escape(";".join(set(LOW_QUALITY_FLAGS) & set(flags_of(f)))))
                    for fp, f in zip(shown["filepath"], shown["flags"], strict=True))
    cols = [c for c in ("blur", "brightness", "contrast", "entropy") if c in m.columns]
    body = "".join(f"<tr><td>{html.escape(r['filepath'])}</td><td>{html.escape(r['label'])}</td>"
                   f"<td>{html.escape(r['flags'])}</td>" + "".join(f'<td class="n">{_num(r[c])}</td>' for c in cols)
                   + f"<td>{'kept' if r['filepath'] in kept else 'removed'}</td></tr>" for _, r in rows.iterrows())
    head = "".join(f"<th>{c}</th>" for c in ["file", "label", "flags", *cols, "export"])
    return (f"<p>{len(rows)} photos are blurry, dark, bright, low-information, tiny, odd-shaped or grayscale. "
            f"The default policy keeps them (a person decides); "
            + (f"{len(kept)} are in the cleaned manifest." if art.export else "")
            + f"</p><div class='strip'>{strip}</div>"
            f"<details><summary>all {len(rows)} low-quality photos</summary><table><tr>{head}</tr>{body}</table>"
            f"</details>")


def section_cleaning(art: RunArtifacts, metrics: dict) -> str:
    if not art.export:
        chart = chart_class_distribution(metrics["classes"], None)
        return (_missing("The cleaned manifest has not been exported.", "curate export")
                + f'<div class="charts"><img src="{chart}" alt="class distribution"></div>')
    e = art.export
    rows = "".join(f'<tr><td>{html.escape(k)}</td><td class="n">{v}</td></tr>'
                   for k, v in e["removed_by_reason"].items() if v)
    rows += f'<tr><th>removed in all</th><th class="n">{e["removed"]}</th></tr>'
    if e.get("relabelled"):
        to = ", ".join(f"{k}: {v}" for k, v in e.get("relabelled_to", {}).items())
        rows += f'<tr><td>relabelled ({html.escape(to)})</td><td class="n">{e["relabelled"]}</td></tr>'
    ov = e.get("review_overrides", {})
    review = (f"<p>Review tags applied: {ov.get('review_reject', 0)} reject, {ov.get('review_keep', 0)} keep, "
              f"{ov.get('review_relabel', 0)} relabel.</p>") if e.get("review_tags") else (
        "<p class='sub'>No review tags (tag photos <code>reject</code>, <code>keep</code> or "
        "<code>relabel:&lt;class&gt;</code> in <code>curate app</code>; they override the policy).</p>")
    chart = chart_class_distribution(e["classes_before"], e["classes_after"])
    return (f"<p>Policy <b>{html.escape(e['policy'])}</b>: {e['kept']:,} of {e['photos']:,} photos kept in "
            f"<code>cleaned.csv</code>; the removed ones are listed with their reason in <code>removed.csv</code>.</p>"
            f'{review}<div class="charts"><table><tr><th>rule</th><th>photos removed</th></tr>{rows}</table>'
            f'<img src="{chart}" alt="class distribution before and after cleaning"></div>')


def chance_sentence(c: dict) -> str:
    """What answers that ignore the photo would score on the test photos (empty for older compare.json files)."""
    if "chance_accuracy" not in c.get("raw", {}):
        return ""
    t = c["test"]
    return (f"Answers that ignore the photo (each class as often as the model names it) would score "
            f"{c['raw']['chance_accuracy']:.3f} (raw) and {c['clean']['chance_accuracy']:.3f} (cleaned); always "
            f"'{t['largest_class']}' scores {t['largest_class_share']:.3f}.")


def _chance_html(c: dict) -> str:
    sentence = chance_sentence(c)
    return f"<p class='sub'>{html.escape(sentence)}</p>" if sentence else ""


def section_training(art: RunArtifacts) -> str:
    c = art.compare
    if not c:
        return _missing("No before/after training yet.", "curate compare --raw manifest.csv --clean cleaned.csv")
    t = c["test"]
    d, d_f1 = c["difference"], c.get("difference_macro_f1")
    runs = "".join(f"<tr><td>{r['variant']}</td><td>{r['seed']}</td><td class='n'>{r['accuracy']:.3f}</td>"
                   f"<td class='n'>{r['macro_f1']:.3f}</td><td class='n'>{r['seconds']:.0f}</td></tr>"
                   for r in c["runs"])
    f1 = "".join(f"<tr><td>{html.escape(k)}</td><td class='n'>{c['raw']['per_class_f1'][k]:.3f}</td>"
                 f"<td class='n'>{c['clean']['per_class_f1'][k]:.3f}</td>"
                 f"<td class='n'>{c['clean']['per_class_f1'][k] - c['raw']['per_class_f1'][k]:+.3f}</td></tr>"
                 for k in c["classes"])
    curves = chart_curves(art.curves)
    curves_html = (f'<h3>Training curves</h3><div class="charts"><img src="{curves}" alt="training curves"></div>'
                   if curves else "<p class='sub'>No training logs (log.csv) found.</p>")
    acc = chart_accuracy(c)
    cm_raw = chart_confusion(c["raw"]["confusion"], c["classes"], "raw")
    cm_clean = chart_confusion(c["clean"]["confusion"], c["classes"], "cleaned")
    return (
        f"<p>The same recipe (preset <b>{html.escape(str(c['preset']))}</b>"
        f"{', ' + str(c['epochs']) + ' epochs' if c.get('epochs') else ''}, seeds {c['seeds']}) trained on the raw "
        f"and on the cleaned manifest, both scored on the same <b>{t['verified_test']}</b> verified test photos "
        f"(the raw test split of {t['raw_test']} minus {t['excluded_removed']} removed and "
        f"{t['excluded_relabelled']} relabelled by the cleaning).</p>"
        f"<table><tr><th></th><th>accuracy (mean ± sd)</th><th>macro-F1 (mean ± sd)</th></tr>"
        f"<tr><td>raw</td><td class='n'>{_fmt_stat(c['raw']['accuracy'])}</td>"
        f"<td class='n'>{_fmt_stat(c['raw']['macro_f1'])}</td></tr>"
        f"<tr><td>cleaned</td><td class='n'>{_fmt_stat(c['clean']['accuracy'])}</td>"
        f"<td class='n'>{_fmt_stat(c['clean']['macro_f1'])}</td></tr>"
        f"<tr><th>cleaned − raw</th><th class='n'>{d['mean']:+.3f}</th><th class='n'>{_fmt_mean(d_f1)}</th></tr>"
        f"<tr><td>95% CI over seeds</td><td class='n'>{_fmt_ci(d['ci95_seeds'])}</td>"
        f"<td class='n'>{_fmt_ci(d_f1['ci95_seeds']) if d_f1 else '–'}</td></tr>"
        f"<tr><td>95% CI, bootstrap over test photos</td><td class='n'>{_fmt_ci(d['ci95_bootstrap'])}</td>"
        f"<td class='n'>{_fmt_ci(d_f1['ci95_bootstrap']) if d_f1 else '–'}</td></tr></table>"
        f"{_chance_html(c)}<p><b>{html.escape(compare_verdict(c))}</b></p>"
        f'<div class="charts"><img src="{acc}" alt="accuracy before and after cleaning">'
        f"<table><tr><th>class</th><th>F1 raw</th><th>F1 cleaned</th><th>Δ</th></tr>{f1}</table>"
        f"<table><tr><th>run</th><th>seed</th><th>accuracy</th><th>macro-F1</th><th>s</th></tr>{runs}</table></div>"
        f"{curves_html}<h3>Confusion matrices</h3><p class='sub'>{html.escape(c['raw'].get('confusion_note', ''))}"
        f"</p><div class='charts'><img src='{cm_raw}' alt='confusion matrix raw'>"
        f"<img src='{cm_clean}' alt='confusion matrix cleaned'></div>")


def section_sheets(art: RunArtifacts, sheets: list[Path]) -> str:
    if not sheets:
        return "<p>No flagged photos, so no contact sheets.</p>"
    parts = []
    for path in sheets:
        rel = path.relative_to(art.run_dir).as_posix()
        csv = path.with_name(path.name.rsplit("_p", 1)[0] + ".csv").relative_to(art.run_dir).as_posix()
        parts.append(f"<h3>{html.escape(path.stem)}</h3><p class='sub'>numbers → files: "
                     f"<a href='{html.escape(csv)}'>{html.escape(csv)}</a></p>"
                     f"<img class='sheet' src='{html.escape(rel)}' alt='contact sheet {html.escape(path.stem)}'>")
    return ("<p>Numbered proof sheets of every flagged photo (<code>curate preview --by flag</code>); "
            "they live beside this page in <code>sheets/flag/</code>.</p>" + "".join(parts))


SCRIPT = """
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.images);
  var ok = imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length;
  document.body.setAttribute('data-images', ok + '/' + imgs.length);
  if (ok < imgs.length) {
    var note = document.getElementById('broken');
    note.textContent = (imgs.length - ok) + ' image(s) could not be shown: keep index.html beside its sheets/ folder.';
    note.style.display = 'block';
  }
});
"""


def render_html(art: RunArtifacts, metrics: dict, sheets: list[Path]) -> str:
    thumbs = Thumbnails(art.data_root)
    counts = metrics["issues"]
    sections = [
        ("Summary", section_summary(art, metrics)),
        ("Issues found", section_issues(art, thumbs, counts)),
        ("Duplicate groups", section_duplicates(art, thumbs)),
        ("Off-class candidates", section_off_class(art, thumbs)),
        ("Low-quality photos (kept, listed)", section_low_quality(art, thumbs)),
        ("Cleaning", section_cleaning(art, metrics)),
        ("Accuracy before and after cleaning", section_training(art)),
        ("Contact sheets of flagged photos", section_sheets(art, sheets)),
    ]
    body = "".join(f"<section><h2>{html.escape(t)}</h2>{s}</section>" for t, s in sections)
    data = html.escape(str(art.data_root or "?"))
    return (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
            f"<meta name='viewport' content='width=device-width, initial-scale=1'>"
            f"<title>curate report: {html.escape(art.name)}</title><style>{CSS}</style></head><body><main>"
            f"<h1>Dataset audit: {html.escape(art.name)}</h1><p class='sub'>{metrics['photos']:,} photos in {data}"
            f"</p><p id='broken' class='missing'></p>{body}</main><script>{SCRIPT}</script></body></html>")


def render_markdown(art: RunArtifacts, metrics: dict) -> str:
    lines = [f"# Dataset audit: {art.name}", "", f"{metrics['photos']:,} photos in `{art.data_root}`; "
             f"{metrics['photos_flagged']:,} carry at least one issue.", "", "## Classes", "",
             "| class | raw | cleaned |", "|---|---:|---:|"]
    after = (art.export or {}).get("classes_after", {})
    for k, v in metrics["classes"].items():
        lines.append(f"| {k} | {v} | {after.get(k, '—') if art.export else '—'} |")
    lines += ["", "## Issues", "", "| issue | photos |", "|---|---:|"]
    lines += [f"| {k} | {v} |" for k, v in metrics["issues"].items()] or ["| (none) | 0 |"]
    if not art.flagged:
        lines += ["", "_Flag stage not run (`curate flag`): no off-class scores._"]
    else:
        lines += ["", f"Off-class candidates: {metrics.get('off_class_candidates', 0)}."]
    lines += ["", "## Cleaning", ""]
    if art.export:
        e = art.export
        lines += [f"Policy `{e['policy']}`: kept {e['kept']:,} of {e['photos']:,}, removed {e['removed']:,}, "
                  f"relabelled {e['relabelled']:,}; {e['low_quality_kept']:,} low-quality "
                  f"photo{'' if e['low_quality_kept'] == 1 else 's'} kept.", "",
                  "| rule | removed |", "|---|---:|"]
        lines += [f"| {k} | {v} |" for k, v in e["removed_by_reason"].items() if v] or ["| (none) | 0 |"]
    else:
        lines.append("_Not exported yet (`curate export`)._")
    lines += ["", "## Accuracy before and after cleaning", ""]
    if art.compare:
        c = art.compare
        d = c["difference"]
        lines += [f"Preset `{c['preset']}`, seeds {c['seeds']}, {c['test']['verified_test']} verified test photos "
                  f"(raw test {c['test']['raw_test']} minus {c['test']['excluded_removed']} removed, "
                  f"{c['test']['excluded_relabelled']} relabelled).", "",
                  "| | accuracy (mean ± sd) | macro-F1 | per seed |", "|---|---:|---:|---|",
                  f"| raw | {_fmt_stat(c['raw']['accuracy'])} | {_fmt_stat(c['raw']['macro_f1'])} | "
                  f"{', '.join(f'{a:.3f}' for a in c['raw']['accuracy']['per_seed'])} |",
                  f"| cleaned | {_fmt_stat(c['clean']['accuracy'])} | {_fmt_stat(c['clean']['macro_f1'])} | "
                  f"{', '.join(f'{a:.3f}' for a in c['clean']['accuracy']['per_seed'])} |", "",
                  f"Cleaned − raw accuracy: {d['mean']:+.3f} (95% CI over seeds {_fmt_ci(d['ci95_seeds'])}, "
                  f"bootstrap over test photos {_fmt_ci(d['ci95_bootstrap'])})."]
        f1 = c.get("difference_macro_f1")
        if f1:
            lines += ["", f"Cleaned − raw macro-F1: {f1['mean']:+.3f} (95% CI over seeds {_fmt_ci(f1['ci95_seeds'])}, "
                          f"bootstrap over test photos {_fmt_ci(f1['ci95_bootstrap'])})."]
        if chance_sentence(c):
            lines += ["", chance_sentence(c)]
        lines += ["", f"**{compare_verdict(c)}**", "",
                  "| class | F1 raw | F1 cleaned |",
                  "|---|---:|---:|"]
        lines += [f"| {k} | {c['raw']['per_class_f1'][k]:.3f} | {c['clean']['per_class_f1'][k]:.3f} |"
                  for k in c["classes"]]
    else:
        lines.append("_Not compared yet (`curate compare`)._")
    return "\n".join(lines) + "\n"


def flagged_sheets(art: RunArtifacts) -> list[Path]:
    """The contact sheets of flagged photos; drawn now when `curate preview --by flag` has not drawn
    them for the current flags (a sheet set whose CSV lists other photos is stale)."""
    folder = art.run_dir / "sheets" / "flag"
    wanted: dict[str, set[str]] = {}
    for fp, cell in zip(art.manifest["filepath"], art.manifest["flags"], strict=True):
        for f in flags_of(cell):
            wanted.setdefault(f, set()).add(fp)
    if not wanted:
        return []

    def up_to_date(name: str) -> bool:
        from curate.preview import safe_name

        table = _read_csv(folder / f"{safe_name(name)}.csv")
        return table is not None and set(table["filepath"]) == wanted[name] and any(
            folder.glob(f"{safe_name(name)}_p*.png"))

    if not all(up_to_date(n) for n in wanted) and art.data_root is not None and art.data_root.is_dir():
        from curate.preview import write_sheets

        folder.mkdir(parents=True, exist_ok=True)
        write_sheets(art.manifest, art.data_root, folder, by="flag")
    from curate.preview import safe_name

    stems = {safe_name(n) for n in wanted}
    return sorted(p for p in folder.glob("*_p*.png") if p.name.rsplit("_p", 1)[0] in stems) if folder.is_dir() else []


def report(run: str | os.PathLike | None = None) -> Path:
    """Write `<run>/index.html`, `<run>/report.md` and `<run>/metrics.json`; return the HTML path."""
    run_dir = resolve_run_dir(run)
    with run_lock(run_dir, "report"):
        art = load_artifacts(run_dir)
        metrics = build_metrics(art)
        sheets = flagged_sheets(art)
        page = render_html(art, metrics, sheets)
        atomic_write_text(run_dir / "index.html", page)
        atomic_write_text(run_dir / "report.md", render_markdown(art, metrics))
        atomic_write_json(run_dir / "metrics.json", metrics)
    log.info("report: %s (%.1f MB)", run_dir / "index.html", len(page) / 1e6)
    return run_dir / "index.html"
