"""End to end: `curate app` serves the FiftyOne App; headless Chromium opens a saved view and sees its photos.

The App (a React page that draws each sample on a canvas) is loaded in Debian's `chromium`; the
test reads the rendered DOM (--dump-dom, retried with a growing virtual-time budget until the grid
has drawn or a deadline passes) and a screenshot. Every process started here -- `curate app`, the
FiftyOne server under it, Chromium, the private mongod -- is stopped at the end.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import requests
from PIL import Image
from test_fiftyone import free_port, private_mongo, write_small_run  # noqa: F401 -- private_mongo is a fixture

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--window-size=1400,900"]


def chromium_binary() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.fail("Debian's chromium is missing: `apt-get install -y chromium` (scripts/test.sh installs it)")
    return exe


def run_chromium(args: list[str], profile: Path, timeout: float) -> str:
    """Run headless Chromium in its own process group (killed whole on timeout); return stdout."""
    proc = subprocess.Popen([chromium_binary(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
        return out
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def lookers(dom: str) -> list[tuple[bool, str]]:
    """(canvas drawn, ground-truth label) for each sample tile of the App's grid, in page order."""
    tiles = re.findall(r'data-cy="looker".*?(?=data-cy="looker"|$)', dom, flags=re.S)
    out = []
    for t in tiles:
        gt = re.search(r'title="ground_truth: ([^"]+)"', t)
        out.append(('canvas-loaded="true"' in t, gt.group(1) if gt else ""))
    return out


@pytest.fixture
def app_server(private_mongo, tmp_path: Path):  # noqa: F811 -- the imported fixture
    """`curate app` on a free port of 127.0.0.1 over a small real run; yields (run_dir, manifest, output path, port)."""
    from conftest import make_dataset

    data = make_dataset(tmp_path / "flowers", per_class=6)
    run_dir = tmp_path / "run"
    manifest = write_small_run(run_dir, data)
    port = free_port()
    out_path = tmp_path / "app.out"
    with open(out_path, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "curate.cli", "app", "--run", str(run_dir), "--port", str(port),
                                 "--address", "127.0.0.1"], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
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
    assert url.startswith(f"http://127.0.0.1:{port}/datasets/curate-run?view=")

    expected = manifest[manifest["flags"].str.contains("off_class|outlier")].sort_values("label_quality")
    # poll the rendered page with a growing virtual-time budget until every tile has drawn its photo
    deadline = time.monotonic() + 240
    budget = 10_000
    while True:
        profile = tmp_path / f"profile-{budget}"
        dom = run_chromium([f"--virtual-time-budget={budget}", "--dump-dom", url], profile, timeout=120)
        tiles = lookers(dom)
        if len(tiles) == len(expected) and all(drawn for drawn, _ in tiles):
            break
        assert time.monotonic() < deadline, f"grid never drew {len(expected)} photos; last saw {tiles}"
        budget *= 2
    assert [label for _, label in tiles] == expected["label"].tolist()  # worst (lowest label_quality) first
    assert "off_class_candidates" in dom  # the saved view is the one selected
    assert "Help us improve FiftyOne" not in dom and "btn-disable-cookies" not in dom  # no analytics banner

    shot = tmp_path / "app_off_class_candidates.png"
    run_chromium([f"--virtual-time-budget={budget}", f"--screenshot={shot}", url], tmp_path / "profile-shot",
                 timeout=120)
    img = np.asarray(Image.open(shot).convert("RGB"), dtype=np.float32)
    grid = img[150:330, 320:1380]  # the first row of the grid, right of the sidebar
    # real photos: many distinct colours and strong variation, unlike an empty dark grid or a spinner
    assert grid.std() > 30 and len(np.unique(grid.reshape(-1, 3).astype(np.uint8), axis=0)) > 2000
    print(f"screenshot: {shot}")
