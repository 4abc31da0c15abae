"""End to end: `curate app` serves the FiftyOne App; headless Chromium opens a saved view and sees its photos.

The App (a React page that draws each sample on a canvas) is loaded in Debian's `chromium`, driven
over the DevTools protocol: the test polls the page until every tile of the grid has drawn its photo
(or a deadline passes), then checks the tiles' order, the DOM and a screenshot. Every process
started here -- `curate app`, the FiftyOne server under it, Chromium, the private mongod -- is
stopped at the end.
"""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import requests
from devtools import chromium_page
from PIL import Image
from test_fiftyone import as_twelve_bit, free_port, private_mongo, write_small_run  # noqa: F401 -- a fixture

ROOT = Path(__file__).resolve().parents[1]


# The page is "ready" when the grid shows a tile per sample (at most a screenful) and every tile's
# canvas has drawn its photo; the value is (drawn, ground-truth label) per tile in page order.
GRID_STATE_JS = """JSON.stringify(Array.from(document.querySelectorAll('[data-cy="looker"]')).map(t => [
    !!t.querySelector('canvas[canvas-loaded="true"]'),
    (t.querySelector('[data-cy="tag-ground_truth"]') || {}).textContent || ""]))"""


def grid_of(url: str, profile: Path, ready, timeout: float, screenshot: Path | None = None) -> tuple[list, str, str]:
    """Open `url` in headless Chromium, poll until `ready(state, dom)` or `timeout`; return (state, DOM, visible text).

    `state` is GRID_STATE_JS's value, `dom` the page's HTML at that moment. It waits in real time for
    what the page shows, polling once a second: on a loaded machine the grid may be complete before
    the view bar is.
    """
    deadline = time.monotonic() + timeout
    with chromium_page(profile) as page:
        page.call("Page.enable")
        page.call("Page.navigate", {"url": url})
        state: list = []
        while time.monotonic() < deadline:
            value = page.call("Runtime.evaluate", {"expression": GRID_STATE_JS, "returnByValue": True})
            state = json.loads(value["result"].get("value") or "[]")
            if ready(state, evaluate(page, "document.documentElement.outerHTML")):
                break
            time.sleep(1)
        time.sleep(1)  # let the last tiles paint before the screenshot
        if screenshot is not None:
            png = page.call("Page.captureScreenshot", {"format": "png"})["data"]
            screenshot.write_bytes(base64.b64decode(png))
        return state, evaluate(page, "document.documentElement.outerHTML"), evaluate(page, "document.body.innerText")


def evaluate(page, expression: str) -> str:
    """The string value of a JavaScript expression in the page."""
    return page.call("Runtime.evaluate", {"expression": expression, "returnByValue": True})["result"].get("value") or ""


def sort_by_similarity_in_chromium(url: str, profile: Path, tile: int, ready, timeout: float) -> tuple[list, str]:
    """Open `url`, select the grid's `tile`-th photo and run the App's similarity search on it, as a person does:
    the sort-by-similarity action above the grid opens FiftyOne's Similarity Search panel; "New Search", tick
    the photo's checkbox, "Search", then "Execute" (run now; "Schedule" needs a delegated-operation worker).
    Returns (GRID_STATE_JS's value once `ready(state)` or at `timeout`, the page's text then)."""
    deadline = time.monotonic() + timeout

    def poll(expression: str, accept):
        value = None
        while time.monotonic() < deadline:
            value = evaluate(page, expression)
            if accept(value):
                return value
            time.sleep(0.5)
        raise AssertionError(f"gave up waiting for {expression[:80]!r}; last value {str(value)[:300]!r}; page read:\n"
                             f"{evaluate(page, 'document.body.innerText')[:2000]}")

    def click(selector_js: str) -> None:  # a real mouse click at the element's centre
        rect = json.loads(poll(f"JSON.stringify(({selector_js})?.getBoundingClientRect() ?? null)",
                               lambda v: v not in ("", "null")))
        for kind in ("mousePressed", "mouseReleased"):
            page.call("Input.dispatchMouseEvent", {"type": kind, "x": rect["x"] + rect["width"] / 2,
                                                   "y": rect["y"] + rect["height"] / 2, "button": "left",
                                                   "clickCount": 1})

    def button(text: str) -> str:
        return f"[...document.querySelectorAll('button')].find(b => b.textContent.trim() == {text!r} && !b.disabled)"

    with chromium_page(profile) as page:
        page.call("Page.enable")
        page.call("Page.navigate", {"url": url})
        poll(GRID_STATE_JS, lambda v: len(json.loads(v or "[]")) > tile and all(d for d, _ in json.loads(v)))
        # the page draws the grid before its actions answer clicks: click until the panel opens
        while "Similarity Search" not in evaluate(page, "document.body.innerText"):
            assert time.monotonic() < deadline, "the sort-by-similarity action never opened its panel"
            click("document.querySelector('[data-cy=\"action-sort-by-similarity\"]')")
            time.sleep(1)
        # the panel may open on its page about the index (the first time after the server starts): back to its list
        while "New Search" not in evaluate(page, "document.body.innerText"):
            assert time.monotonic() < deadline, "the similarity panel never showed its list of searches"
            evaluate(page, "document.querySelector('button[aria-label=\"Back to similarity searches\"]')?.click()")
            time.sleep(1)
        click(button("New Search"))  # disabled, with "No similarity index computed", when the dataset has none
        # the tile's checkbox shows only under the pointer: click its label from the page instead
        evaluate(page, f"document.querySelectorAll('[data-cy=\"looker\"]')[{tile}].querySelector('label').click()")
        poll("document.body.innerText", lambda text: "1 samples selected" in text)
        # "Search" opens a menu of how to run it (a pointer click on it did not, in headless Chromium: the page's click)
        poll(f"({button('Search')}) ? 'ready' : ''", lambda v: v == "ready")
        evaluate(page, f"({button('Search')}).click()")
        poll("(() => { const run = [...document.querySelectorAll('[role=menuitem]')].find(e => "
             "e.textContent.startsWith('Execute')); run?.click(); return run ? 'clicked' : ''; })()",
             lambda v: v == "clicked")
        # the finished search is listed in the panel; the grid shows its results once it is picked from the list
        poll("document.body.innerText", lambda text: "Completed" in text)
        state: list = []
        while time.monotonic() < deadline:
            state = json.loads(evaluate(page, GRID_STATE_JS) or "[]")
            if ready(state):
                break
            evaluate(page, "[...document.querySelectorAll('*')].filter(e => e.children.length == 0 && "
                           "e.textContent.startsWith('Image similarity (1 prompt)'))[0]?.click()")
            time.sleep(1)
        return state, evaluate(page, "document.body.innerText")


@pytest.fixture
def app_server(private_mongo, tmp_path: Path):  # noqa: F811 -- the imported fixture
    """`curate app` on a free port of 127.0.0.1 over a small real run; yields (run_dir, manifest, output path, port)."""
    from conftest import make_dataset

    data = make_dataset(tmp_path / "flowers", per_class=6)
    # the worst off-class candidate, first in its view, as a 12-bit camera's TIFF: Chromium draws no TIFF
    as_twelve_bit(sorted((data / "roses").glob("*.jpg"))[4], ".tif")
    run_dir = tmp_path / "flower_run"  # dataset curate-flower_run: its URL slug differs from its name
    manifest = write_small_run(run_dir, data)
    port = free_port()
    out_path = tmp_path / "app.out"
    # FiftyOne writes ~/.fiftyone/var (a uid, a welcome note) whatever the database says: give it a temporary home
    env = {**os.environ, "HOME": str(tmp_path / "home")}
    with open(out_path, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "curate.cli", "app", "--run", str(run_dir), "--port", str(port),
                                 "--address", "127.0.0.1"], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                env=env, start_new_session=True)
    started: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 300
        while True:  # the App answers HTTP 20-30 s after launch (import, build, server start)
            assert proc.poll() is None, f"curate app exited ({proc.returncode}):\n{out_path.read_text()[-3000:]}"
            try:
                if requests.get(f"http://127.0.0.1:{port}/fiftyone", timeout=2).ok and \
                        "Ctrl-C stops the App" in out_path.read_text():
                    break
            except requests.RequestException:
                pass
            assert time.monotonic() < deadline, f"App not answering after 300 s:\n{out_path.read_text()[-3000:]}"
            time.sleep(0.5)
        started = psutil.Process(proc.pid).children(recursive=True)
        assert any("main.py" in " ".join(p.cmdline()) for p in started), "no FiftyOne server process found"
        yield run_dir, manifest, out_path, port
    finally:
        # Ctrl-C is how a user stops `curate app`; then make sure nothing it started lives on
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        gone, alive = psutil.wait_procs(started, timeout=30)
        for p in alive:
            p.kill()
        assert not alive, f"left running after Ctrl-C: {[p.pid for p in alive]}"
    assert proc.returncode == 0, out_path.read_text()[-3000:]
    assert "FiftyOne App stopped." in out_path.read_text()


def test_app_shows_off_class_candidates_worst_first_in_chromium(app_server, tmp_path: Path):
    run_dir, manifest, out_path, port = app_server
    printed = out_path.read_text()
    url = re.search(r"off_class_candidates: (http://\S+)", printed).group(1)
    assert url == f"http://127.0.0.1:{port}/datasets/curate-flower_run?view=off-class-candidates"
    # the session itself is on that view, so the App's state and the URL's agree (they raced before)
    main = f"FiftyOne App: http://127.0.0.1:{port}/datasets/curate-flower_run (opens on off_class_candidates)"
    assert main in printed

    expected = manifest[manifest["flags"].str.contains("off_class|outlier")].sort_values("label_quality")
    shot = tmp_path / "app_off_class_candidates.png"
    state, dom, text = grid_of(
        url, tmp_path / "profile", timeout=240, screenshot=shot,
        ready=lambda tiles, dom: len(tiles) == len(expected) and all(d for d, _ in tiles)
        and "off_class_candidates" in dom)
    assert len(state) == len(expected) and all(drawn for drawn, _ in state), f"grid never drew its photos: {state}"
    assert [label for _, label in state] == expected["label"].tolist()  # worst (lowest label_quality) first
    # the saved view is the one selected in the view bar
    assert "off_class_candidates" in dom, f"view bar never named the saved view; the page read:\n{text[:2000]}"
    assert "Help us improve FiftyOne" not in dom and "btn-disable-cookies" not in dom  # no analytics banner

    img = np.asarray(Image.open(shot).convert("RGB"), dtype=np.float32)
    grid = img[150:330, 320:1380]  # the first row of the grid, right of the sidebar
    # real photos: many distinct colours and strong variation, unlike an empty dark grid or a spinner
    assert grid.std() > 30 and len(np.unique(grid.reshape(-1, 3).astype(np.uint8), axis=0)) > 2000
    print(f"screenshot: {shot}")

    # "find more like this one": the App's similarity search over the index `curate app` built, run from the page.
    # Expected: every readable photo by cosine similarity of the run's embeddings, centred on their mean (FiftyOne's
    # sklearn index), to the third photo of the view; the grid shows the closest first (the photo itself)
    emb = np.load(run_dir / "embeddings.npy")
    readable = (manifest["error"].fillna("") == "").to_numpy()  # the unreadable photo is not in the index
    z = emb - emb[readable].mean(axis=0)
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    query = manifest.index.get_loc(expected.index[2])
    nearest = manifest["label"].to_numpy()[np.argsort(-np.where(readable, z @ z[query], -np.inf), kind="stable")]
    state, text = sort_by_similarity_in_chromium(
        url, tmp_path / "profile2", tile=2, timeout=180, ready=lambda tiles: len(tiles) > len(expected)
        and all(d for d, _ in tiles) and [g for _, g in tiles] == nearest[:len(tiles)].tolist())
    assert len(state) > len(expected), f"the grid never showed the search's results: {state}; the page read:\n{text}"
    assert [label for _, label in state] == nearest[:len(state)].tolist()
