"""`curate run`: the main job in one command: fetch, scan, flag, export, compare, report.

Prints one progress line per stage and skips a stage whose outputs are up to date. "Up to date"
is decided by fingerprints kept in `<run>/pipeline.json`: for each stage, a key made of its
options and of the fingerprints of what it reads (the data folder's listing for scan; the
previous stages' outputs for the rest), and the sha256 of each output it wrote. A stage runs
again when its key changed, or when one of its outputs is missing or was changed by someone else
(e.g. a manual `curate scan`), and every stage after it follows because its key changes too.
Export always runs when the run has a FiftyOne dataset, because review tags live in the App's
database, not in a file. Compare resumes per seed (see `curate.compare`), so an interrupted run
loses at most one training.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from curate.io import CurateError, atomic_write_json, default_run_dir, read_json, sha256_of

log = logging.getLogger("curate.pipeline")

STATE_FILE = "pipeline.json"
STAGES = ("fetch", "scan", "flag", "export", "compare", "report")


def data_fingerprint(data: Path) -> str:
    """A digest of every file's relative path, size and mtime below `data` (cheap: stat only)."""
    h = hashlib.sha256()
    for root, dirs, files in os.walk(data):
        dirs.sort()
        for name in sorted(files):
            p = Path(root, name)
            try:
                st = p.stat()
            except OSError:
                continue
            h.update(f"{p.relative_to(data).as_posix()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _key(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


@dataclass
class Stage:
    """One step of the pipeline: what it writes, how to fingerprint its inputs, how to run it."""

    name: str
    outputs: Callable[[Path], list[Path]]  # the files it writes (those present after it ran are recorded)
    key: Callable[[dict], str]  # from the recorded state of the stages before it
    run: Callable[[], None]
    always: Callable[[], bool] = lambda: False  # True: run even when the key matches
    # what later stages' keys see of this one (default: its outputs); scan offers its manifest and
    # duplicates, not scan.json, whose timings change on every run while the content does not
    provides: Callable[[Path], list[Path]] | None = None


class PipelineState:
    """`<run>/pipeline.json`: per stage, its key, its outputs' sha256 and how long it took."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / STATE_FILE
        self.run_dir = run_dir
        self.stages: dict[str, dict] = {}
        if self.path.exists():
            try:
                self.stages = read_json(self.path).get("stages", {})
            except (OSError, ValueError):
                log.warning("%s: unreadable; every stage will run", self.path)

    def up_to_date(self, name: str, key: str) -> bool:
        rec = self.stages.get(name)
        if not rec or rec.get("key") != key or not rec.get("outputs"):
            return False
        for rel, digest in rec["outputs"].items():
            p = self.run_dir / rel
            if not p.exists() or sha256_of(p) != digest:
                return False
        return True

    def record(self, name: str, key: str, outputs: list[Path], provides: list[Path], seconds: float) -> None:
        def digests(paths: list[Path]) -> dict[str, str]:
            return {p.relative_to(self.run_dir).as_posix(): sha256_of(p) for p in paths if p.exists()}

        self.stages[name] = {"key": key, "outputs": digests(outputs), "provides": digests(provides),
                             "seconds": round(seconds, 1), "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        atomic_write_json(self.path, {"stages": self.stages})



@contextlib.contextmanager
def _pipeline_lock(run_dir: Path) -> Iterator[None]:
    # Each stage takes the run folder's own lock while it writes; this one keeps a second
    # `curate run` from interleaving its stages with ours between those locks.
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / ".pipeline.lock", "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise CurateError(f"{run_dir}: another `curate run` is working in this folder") from None
        yield


def run(data: str | os.PathLike = "flower_photos", source: str | os.PathLike | None = None,
        out: str | os.PathLike | None = None, fast: bool = False, preset: str = "cpu", seeds: int = 3,
        compare: bool = True, progress: bool = True, policy: str = "default", epochs: int | None = None,
        scene: bool = True, max_off_class: float | None = None) -> Path:
    """Fetch (if DATA is missing), scan, flag, export, compare (unless `compare=False`) and report.

    `epochs` overrides the compare preset's number of epochs (None: the preset's own); `scene=False`
    flags without the scene measures (people, straight edges, depth of field, colour, foliage;
    `curate flag --no-scene`); `max_off_class` caps the share of photos flagged off_class (and so removed
    by the default export policy; `curate flag --max-off-class`; None: FlagConfig's default).

    Returns the report's path (`<run>/index.html`).
    """
    data = Path(data)
    run_dir = Path(out) if out else default_run_dir(data)
    data_real = os.path.realpath(data)
    if os.path.realpath(run_dir) == data_real or os.path.realpath(run_dir).startswith(data_real + os.sep):
        # refuse before the pipeline lock creates the folder: DATA is never written to
        raise CurateError(f"{run_dir}: the run folder may not be inside DATA ({data}); DATA is never written to")
    started = time.monotonic()
    with _pipeline_lock(run_dir):
        state = PipelineState(run_dir)
        stages = _stages(data, source, run_dir, fast, preset, seeds, compare, progress, policy, epochs, scene,
                         max_off_class)
        total = len(stages)
        for i, stage in enumerate(stages, 1):
            if stage.name == "fetch":
                _run_fetch(data, source, progress, f"[{i}/{total}]")
                continue
            key = stage.key(state.stages)
            if state.up_to_date(stage.name, key) and not stage.always():
                log.info("[%d/%d] %s: up to date, skipped", i, total, stage.name)
                continue
            log.info("[%d/%d] %s ...", i, total, stage.name)
            t0 = time.monotonic()
            stage.run()
            seconds = time.monotonic() - t0
            outputs = stage.outputs(run_dir)
            state.record(stage.name, key, outputs, stage.provides(run_dir) if stage.provides else outputs, seconds)
            log.info("[%d/%d] %s: done in %s", i, total, stage.name, _duration(seconds))
    page = run_dir / "index.html"
    log.info("curate run: finished in %s; report: %s", _duration(time.monotonic() - started), page)
    return page


def _duration(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def _run_fetch(data: Path, source: str | os.PathLike | None, progress: bool, step: str) -> None:
    from curate.fetch import fetch, has_dataset

    if has_dataset(data):
        log.info("%s fetch: %s is in place, skipped", step, data)
        return
    if source is None and data.name != "flower_photos":
        raise CurateError(f"{data}: no dataset here; pass a folder of class folders, or --from PATH to fetch one")
    t0 = time.monotonic()
    log.info("%s fetch: %s -> %s ...", step, source or "download", data)
    fetch(source, data, progress=progress)
    log.info("%s fetch: done in %s", step, _duration(time.monotonic() - t0))


def _provided(state: dict, stage: str) -> dict | None:
    rec = state.get(stage, {})
    return rec.get("provides", rec.get("outputs"))


def _stages(data: Path, source, run_dir: Path, fast: bool, preset: str, seeds: int, do_compare: bool,
            progress: bool, policy: str, epochs: int | None = None, scene: bool = True,
            max_off_class: float | None = None) -> list[Stage]:
    from curate.labels import flag_config

    # the flag stage's key holds its whole recipe: a run scored with other weights or detectors is redone
    config = flag_config(scene=scene, max_off_class=max_off_class)
    flag_recipe = repr(config)

    def scan_run() -> None:
        from curate.scan import scan

        scan(data, out=run_dir, progress=progress)

    def flag_run() -> None:
        from curate.labels import flag

        flag(run_dir, fast=fast, progress=progress, config=config)

    def export_run() -> None:
        from curate.export import export

        export(run_dir, policy=policy)

    def compare_run() -> None:
        from curate.compare import compare

        compare(run_dir / "manifest.csv", run_dir / "cleaned.csv", data=data, run=run_dir, preset=preset,
                seeds=seeds, epochs=epochs, progress=progress)

    def report_run() -> None:
        from curate.report import report

        report(run_dir)

    stages = [
        Stage("fetch", lambda d: [], lambda s: "", lambda: None),
        Stage("scan", lambda d: [d / "scan.json", d / "duplicates.csv"],
              lambda s: _key("scan", str(data.resolve()), data_fingerprint(data)), scan_run,
              provides=lambda d: [d / "manifest.csv", d / "duplicates.csv"]),
        Stage("flag", lambda d: [d / "manifest.csv", d / "clusters.csv", d / "embeddings.npy", *d.glob("oof_*.npy")],
              lambda s: _key("flag", fast, flag_recipe, _provided(s, "scan")), flag_run),
        Stage("export", lambda d: [d / "cleaned.csv", d / "removed.csv", d / "export.json"],
              lambda s: _key("export", policy, _provided(s, "flag")), export_run,
              always=lambda: (run_dir / "fiftyone.json").exists()),
    ]
    if do_compare:
        stages.append(Stage("compare", lambda d: [d / "compare.json"],
                            # epochs joins the key only when set, so runs with the preset's own keep their key
                            lambda s: _key("compare", preset, seeds, *([epochs] if epochs else []),
                                           _provided(s, "export"), _provided(s, "flag")), compare_run))
    stages.append(Stage("report", lambda d: [d / "index.html", d / "report.md", d / "metrics.json"],
                        lambda s: _key("report", {k: _provided(s, k) for k in s if k != "report"}),
                        report_run))
    return stages
