"""Build small run folders from real photos for the export/compare/report/preview tests.

The manifest follows the scan contract (real sha256, size and pixel statistics of each photo);
flags, duplicate groups and flag-stage columns are set by the test, so each test states the
situation it checks instead of depending on what a detector happens to find.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

MANIFEST_COLUMNS = ["filepath", "label", "bytes", "sha256", "format", "width", "height", "mode", "phash", "dhash",
                    "blur", "brightness", "contrast", "entropy", "dup_group", "flags", "error"]


def manifest_of(data: Path) -> pd.DataFrame:
    """A scan-like manifest of every file under data/<class>/ (unreadable files get `error`)."""
    rows = []
    for path in sorted(p for p in data.rglob("*") if p.is_file()):
        rel = path.relative_to(data).as_posix()
        raw = path.read_bytes()
        row = dict(filepath=rel, label=rel.split("/")[0], bytes=len(raw), sha256=hashlib.sha256(raw).hexdigest(),
                   format="", width=0, height=0, mode="", phash="", dhash="", blur=np.nan, brightness=np.nan,
                   contrast=np.nan, entropy=np.nan, dup_group="", flags="", error="")
        try:
            with Image.open(path) as im:
                im.load()
                gray = np.asarray(im.convert("L"), dtype=np.float32)
                row.update(format=im.format, width=im.width, height=im.height, mode=im.mode,
                           phash="0" * 16, dhash="0" * 16, blur=float(gray.var()), brightness=float(gray.mean()),
                           contrast=float(gray.std()), entropy=float(im.convert("L").entropy()))
        except Exception as exc:  # noqa: BLE001 -- any decode failure is a row with an error, as in scan
            row.update(error=f"cannot decode: {exc}", flags="not_image")
        rows.append(row)
    return pd.DataFrame(rows, columns=MANIFEST_COLUMNS)


def write_run(run_dir: Path, data: Path, manifest: pd.DataFrame, groups: dict[str, list[str]] | None = None,
              kinds: dict[str, str] | None = None) -> Path:
    """Write manifest.csv, scan.json and duplicates.csv (first path of each group is its `keep`)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    manifest = manifest.copy()
    dup_rows = []
    for gid, paths in (groups or {}).items():
        kind = (kinds or {}).get(gid, "near")
        labels = manifest.set_index("filepath").loc[paths, "label"]
        for i, fp in enumerate(paths):
            dup_rows.append(dict(dup_group=gid, kind=kind, filepath=fp, label=labels[fp], distance=0 if i == 0 else 2,
                                 keep=i == 0))
            row = manifest["filepath"] == fp
            manifest.loc[row, "dup_group"] = gid
            flag = f"{kind}_duplicate" + (";cross_label_duplicate" if labels.nunique() > 1 else "")
            for name in flag.split(";"):
                add_flag(manifest, fp, name)
    manifest.to_csv(run_dir / "manifest.csv", index=False)
    pd.DataFrame(dup_rows, columns=["dup_group", "kind", "filepath", "label", "distance", "keep"]).to_csv(
        run_dir / "duplicates.csv", index=False)
    (run_dir / "scan.json").write_text(json.dumps({"data": str(data.resolve()), "thresholds": {}, "counts": {}}))
    return run_dir


def add_flag(manifest: pd.DataFrame, filepath: str, flag: str) -> None:
    row = manifest["filepath"] == filepath
    assert row.any(), filepath
    manifest.loc[row, "flags"] = manifest.loc[row, "flags"].map(lambda c: ";".join(filter(None, [c, flag])))


def add_flag_columns(manifest: pd.DataFrame, suggestions: dict[str, str] | None = None) -> pd.DataFrame:
    """The columns `curate flag` adds; `suggestions` maps filepath -> suggested_label."""
    m = manifest.copy()
    m["label_quality"] = np.linspace(0.99, 0.5, len(m))
    m["q_cleanlab"] = m["label_quality"]
    m["q_knn"] = m["label_quality"]
    m["q_cluster"] = m["label_quality"]
    m["suggested_label"] = m["label"]
    for fp, lab in (suggestions or {}).items():
        m.loc[m["filepath"] == fp, "suggested_label"] = lab
        m.loc[m["filepath"] == fp, "label_quality"] = 0.05
    m["cluster"] = m.groupby("label").cumcount() % 2
    m["models_disagreeing"] = 0
    return m


def open_in_chromium(path: Path, timeout: float = 60.0) -> tuple[list[tuple[str, bool]], list[str]]:
    """Load `path` in headless Debian chromium; return (images as (src prefix, loaded?), console errors).

    Talks the DevTools protocol over --remote-debugging-pipe (fds 3 and 4, NUL-separated JSON), so no
    websocket library or port is needed. Errors are uncaught exceptions, console.error calls and
    browser log entries of level error (e.g. an image that failed to load).
    """
    import fcntl
    import os
    import select
    import shutil
    import subprocess
    import tempfile
    import time

    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        raise AssertionError("chromium is not installed (scripts/test.sh installs Debian's chromium)")
    to_chrome_r, to_chrome_w = os.pipe()
    from_chrome_r, from_chrome_w = os.pipe()

    def child_fds() -> None:  # runs in the child: put the pipe ends on fds 3 and 4
        a = fcntl.fcntl(to_chrome_r, fcntl.F_DUPFD, 10)
        b = fcntl.fcntl(from_chrome_w, fcntl.F_DUPFD, 10)
        os.dup2(a, 3)
        os.dup2(b, 4)

    profile = tempfile.mkdtemp(prefix="chromium-profile-")
    proc = subprocess.Popen(
        [exe, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--remote-debugging-pipe", f"--user-data-dir={profile}",
         "about:blank"],
        preexec_fn=child_fds, close_fds=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.close(to_chrome_r)
    os.close(from_chrome_w)
    buf, messages, next_id = b"", [], [0]
    deadline = time.monotonic() + timeout

    def send(method: str, params: dict | None = None, session: str | None = None) -> int:
        next_id[0] += 1
        msg = {"id": next_id[0], "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(to_chrome_w, json.dumps(msg).encode() + b"\0")
        return next_id[0]

    def wait_for(pred) -> dict:
        nonlocal buf
        while time.monotonic() < deadline:
            while b"\0" in buf:
                raw, buf = buf.split(b"\0", 1)
                msg = json.loads(raw)
                messages.append(msg)
                if pred(msg):
                    return msg
            ready, _, _ = select.select([from_chrome_r], [], [], 0.5)
            if ready:
                chunk = os.read(from_chrome_r, 1 << 20)
                if not chunk:
                    raise AssertionError("chromium closed the DevTools pipe")
                buf += chunk
        raise AssertionError(f"chromium: no answer within {timeout} s")

    def call(method: str, params: dict | None = None, session: str | None = None) -> dict:
        i = send(method, params, session)
        reply = wait_for(lambda m: m.get("id") == i)
        assert "error" not in reply, reply
        return reply["result"]

    try:
        target = call("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for method in ("Runtime.enable", "Log.enable", "Page.enable"):
            call(method, session=session)
        send("Page.navigate", {"url": path.resolve().as_uri()}, session=session)
        wait_for(lambda m: m.get("method") == "Page.loadEventFired")
        expr = ("JSON.stringify(Array.from(document.images).map(i => "
                "[i.getAttribute('src').slice(0, 40), i.complete && i.naturalWidth > 0]))")
        value = call("Runtime.evaluate", {"expression": expr, "returnByValue": True}, session=session)
        images = [tuple(x) for x in json.loads(value["result"]["value"])]
        try:
            call("Browser.close")
        except AssertionError:
            pass
    finally:
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        os.close(to_chrome_w)
        os.close(from_chrome_r)
        shutil.rmtree(profile, ignore_errors=True)
    errors = []
    for m in messages:
        p = m.get("params", {})
        if m.get("method") == "Runtime.exceptionThrown":
            d = p["exceptionDetails"]
            errors.append(d.get("exception", {}).get("description") or d.get("text", "exception"))
        elif m.get("method") == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
            errors.append(" ".join(str(a.get("value", a.get("description", ""))) for a in p.get("args", [])))
        elif m.get("method") == "Log.entryAdded" and p["entry"]["level"] == "error":
            errors.append(f"{p['entry']['text']} {p['entry'].get('url', '')}")
    return images, errors
