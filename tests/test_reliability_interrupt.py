"""Killing `curate scan` and `curate flag` mid-run (SIGINT and SIGKILL, in a subprocess) leaves no partial output in
place; the next run finishes with the same outputs as an uninterrupted run. Two runs on one folder: the second is
refused with a clear message.

The kill is triggered by the command's own progress on stderr (the tqdm counter passing a few files), never by a
fixed sleep; a deadline only bounds how long the test waits for that progress.
"""

from __future__ import annotations

import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil  # installed with fiftyone and dask.distributed (both require it)
import pytest
from badinputs import run_cli
from conftest import make_dataset, tree_fingerprint

from curate.io import append_journal, compact_journal, journal_parts, read_journaled, run_lock

ROOT = Path(__file__).resolve().parents[1]
OUTPUTS = ("manifest.csv", "duplicates.csv", "scan.json", "clusters.csv", "embeddings.npy", "oof_knn.npy")


def _curate(*args: str) -> list[str]:
    return [sys.executable, "-m", "curate.cli", *args]


def _start(args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=os.getcwd())


def _wait_for_progress(proc: subprocess.Popen, desc: str, at_least: int, timeout: float = 240.0) -> str:
    """Read stderr until the tqdm bar `desc` shows n >= at_least of N (n < N); return what was read."""
    pattern = re.compile(rf"{re.escape(desc)}:\s+\d+%\|[^|]*\|\s*(\d+)/(\d+)")
    buf = b""
    deadline = time.monotonic() + timeout
    fd = proc.stderr.fileno()
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.5)
        if ready:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            buf += chunk
            counts = [(int(n), int(t)) for n, t in pattern.findall(buf.decode(errors="replace"))]
            if counts and counts[-1][0] >= at_least:
                n, total = counts[-1]
                assert n < total, f"{desc} finished before it could be interrupted ({n}/{total})"
                return buf.decode(errors="replace")
        elif proc.poll() is not None:
            break
    proc.kill()
    proc.wait()
    raise AssertionError(f"no {desc} progress to {at_least} within {timeout} s; stderr: {buf.decode()[-2000:]}")


def _descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _interrupt(proc: subprocess.Popen, sig: int) -> tuple[int, str, list[int]]:
    """Send `sig` to the command (and, like a terminal's Ctrl-C, to its workers for SIGINT); wait for the end.

    Returns (exit code, stderr, pids of worker processes that outlived the command by 10 s -- killed here).
    """
    children = _descendants(proc.pid)
    proc.send_signal(sig)
    if sig == signal.SIGINT:
        for child in children:
            try:
                child.send_signal(signal.SIGINT)
            except psutil.NoSuchProcess:
                pass
    try:
        proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    _, alive = psutil.wait_procs(children, timeout=10)
    for child in alive:  # orphans hold the stderr pipe open: end them (by pid) before reading it
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=10)
    err = proc.stderr.read().decode(errors="replace")
    proc.stderr.close()
    proc.stdout.close()
    return proc.returncode, err, [c.pid for c in alive]


def _leftovers(run: Path) -> list[str]:
    return [p.name for p in run.rglob("*") if p.name.endswith(".tmp")]


def _assert_no_partial_outputs(run: Path, before: dict, sig: int = signal.SIGINT) -> None:
    """Outputs are the previous complete ones (or absent); after SIGINT no temporary file is left behind
    (a SIGKILL that lands mid-write cannot clean up: the next run removes its file, see the reruns)."""
    after = {k: v for k, v in tree_fingerprint(run).items() if k in OUTPUTS}
    assert after == {k: v for k, v in before.items() if k in OUTPUTS}
    if sig == signal.SIGINT:
        assert _leftovers(run) == []


@pytest.fixture(scope="module")
def big_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """60 real photos per class (300): enough for a scan on one worker to be caught mid-run."""
    return make_dataset(tmp_path_factory.mktemp("interrupt") / "flowers", per_class=60)


@pytest.fixture(scope="module")
def reference(big_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Uninterrupted runs: scan (run/) and scan + flag --fast (flagged/)."""
    base = tmp_path_factory.mktemp("reference")
    rc, _, err = run_cli(["scan", str(big_dataset), "--out", str(base / "run"), "--workers", "2", "-q"])
    assert rc == 0, err
    shutil.copytree(base / "run", base / "flagged")
    rc, _, err = run_cli(["flag", "--run", str(base / "flagged"), "--fast", "-q"])
    assert rc == 0, err
    return {"run": base / "run", "flagged": base / "flagged"}


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["SIGINT", "SIGKILL"])
def test_interrupted_scan_leaves_no_partial_output_and_the_rerun_matches(big_dataset, reference, tmp_path, sig):
    data_before = tree_fingerprint(big_dataset)
    run = tmp_path / "run"
    proc = _start(_curate("scan", str(big_dataset), "--out", str(run), "--workers", "2"))
    _wait_for_progress(proc, "scan", at_least=10)
    rc, err, orphans = _interrupt(proc, sig)
    assert orphans == []
    if sig == signal.SIGINT:
        assert rc == 130 and "interrupted; finished outputs are kept, rerun to resume" in err, (rc, err[-2000:])
        assert "Traceback" not in err
    else:
        assert rc == -signal.SIGKILL
    _assert_no_partial_outputs(run, {}, sig)  # a first scan killed mid-run: no manifest at all
    assert tree_fingerprint(big_dataset) == data_before

    rc, _, err = run_cli(["scan", str(big_dataset), "--out", str(run), "--workers", "2", "-q"])
    assert rc == 0, err
    assert _leftovers(run) == []
    for name in ("manifest.csv", "duplicates.csv"):
        assert (run / name).read_bytes() == (reference["run"] / name).read_bytes(), name
    info = json.loads((run / "scan.json").read_text())
    if sig == signal.SIGINT:
        assert info["from_cache"] >= 10  # resumed: what was read before the interrupt was not read again
    assert tree_fingerprint(big_dataset) == data_before


def test_a_rescan_after_sigkill_resumes_from_what_was_read(big_dataset, tmp_path):
    run = tmp_path / "run"
    proc = _start(_curate("scan", str(big_dataset), "--out", str(run), "--workers", "1"))
    _wait_for_progress(proc, "scan", at_least=150)
    _interrupt(proc, signal.SIGKILL)  # one worker: in-process, no pool
    rc, _, err = run_cli(["scan", str(big_dataset), "--out", str(run), "--workers", "2", "-q"])
    assert rc == 0, err
    # checkpoints every max(64, N/10) files: at least two were saved before the kill at >= 150 of 300
    assert json.loads((run / "scan.json").read_text())["from_cache"] >= 128


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["SIGINT", "SIGKILL"])
def test_interrupted_flag_keeps_the_scan_manifest_and_the_rerun_matches(reference, tmp_path, sig):
    run = tmp_path / "run"
    shutil.copytree(reference["run"], run)
    before = tree_fingerprint(run)
    proc = _start(_curate("flag", "--run", str(run), "--fast"))
    _wait_for_progress(proc, "decode 96px", at_least=5)
    rc, err, orphans = _interrupt(proc, sig)
    assert orphans == []
    if sig == signal.SIGINT:
        assert rc == 130 and "interrupted" in err and "Traceback" not in err, (rc, err[-2000:])
    else:
        assert rc == -signal.SIGKILL
    _assert_no_partial_outputs(run, before, sig)  # manifest.csv is still the scan's, no flag output half-written

    rc, _, err = run_cli(["flag", "--run", str(run), "--fast", "-q"])
    assert rc == 0, err
    assert _leftovers(run) == []
    for name in ("manifest.csv", "clusters.csv"):
        assert (run / name).read_bytes() == (reference["flagged"] / name).read_bytes(), name


def test_taking_the_lock_removes_temporary_files_a_killed_writer_left(reference, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(reference["run"], run)
    (run / "cache").mkdir(exist_ok=True)
    # what curate.io.atomic_path leaves when SIGKILL lands mid-write
    (run / ".manifest.csv.k3j2x_.tmp").write_text("half a manifest")
    (run / "cache" / ".scan_cache.json.a1b2c3.tmp").write_text("{")
    (run / "notes.tmp").write_text("not ours")  # not atomic_path's naming: left alone
    before = (run / "manifest.csv").read_bytes()
    with run_lock(run, "test"):
        assert _leftovers(run) == ["notes.tmp"]
    assert (run / "manifest.csv").read_bytes() == before
    # Ctrl-C between atomic_path's mkstemp and its cleanup (the SIGINT scan test caught this once in CI):
    # the lock holder removes the orphan on its way out
    with pytest.raises(KeyboardInterrupt), run_lock(run, "test"):
        (run / ".scan_cache.json.orphan.tmp").write_text("{")
        raise KeyboardInterrupt
    assert _leftovers(run) == ["notes.tmp"]


# ------------------------------------------------------------------ concurrent runs


def test_a_second_run_on_the_same_folder_is_refused_while_the_first_holds_it(reference, tmp_path, big_dataset):
    run = tmp_path / "run"
    shutil.copytree(reference["flagged"], run)
    before = tree_fingerprint(run)
    commands = {
        "scan": ["scan", str(big_dataset), "--out", str(run)],
        "flag": ["flag", "--run", str(run), "--fast"],
        "export": ["export", "--run", str(run)],
        "report": ["report", "--run", str(run)],
        "compare": ["compare", "--raw", str(run / "manifest.csv"), "--clean", str(run / "manifest.csv"),
                    "--run", str(run), "--preset", "tiny", "--seeds", "1"],
    }
    with run_lock(run, "scan"):
        for name, args in commands.items():
            rc, _, err = run_cli([*args, "-q"])
            assert rc == 2, (name, err)
            assert f"curate {name}: error: {run}: another curate run is using this folder (curate scan, pid " \
                   f"{os.getpid()})" in err, (name, err)
    assert {k: v for k, v in tree_fingerprint(run).items() if k != ".lock"} == \
           {k: v for k, v in before.items() if k != ".lock"}
    # and a real second process: `curate scan` running, `curate flag` on its folder is refused
    proc = _start(_curate("scan", str(big_dataset), "--out", str(run), "--workers", "1", "--no-cache"))
    try:
        _wait_for_progress(proc, "scan", at_least=3)
        rc, _, err = run_cli(["flag", "--run", str(run), "--fast", "-q"])
        assert rc == 2 and f"another curate run is using this folder (curate scan, pid {proc.pid})" in err, err
    finally:
        assert _interrupt(proc, signal.SIGINT)[2] == []
    # once the holder is gone the folder is free again (a killed holder releases the flock too)
    rc, _, err = run_cli(["export", "--run", str(run), "-q"])
    assert rc == 0, err


def test_two_pipeline_runs_on_one_folder(small_dataset, tmp_path):
    from curate.pipeline import _pipeline_lock

    with _pipeline_lock(tmp_path / "r"):
        rc, _, err = run_cli(["run", str(small_dataset), "--out", str(tmp_path / "r"), "--fast", "--skip-compare",
                              "-q"])
    assert rc == 2 and f"{tmp_path / 'r'}: another `curate run` is working in this folder" in err
    assert not (tmp_path / "r" / "manifest.csv").exists()


def test_a_cache_journal_keeps_its_parts_in_order_past_five_digits(tmp_path):
    """Parts are read oldest first and numbered on: part 100000 comes after 99999 (not between 09999 and 10000,
    as names sort), so the next part never overwrites one that exists."""
    cache = tmp_path / "scene.csv"
    for number in (99999, 100000, 9):
        (tmp_path / f"scene.csv.part-{number:05d}").write_text(f"key,value\nphoto,{number}\n")
    (tmp_path / "scene.csv.part-notes").write_text("not a part")
    assert [p.name.rsplit("-", 1)[1] for p in journal_parts(cache)] == ["00009", "99999", "100000"]

    def read(path):
        return dict(line.split(",") for line in path.read_text().splitlines()[1:])

    def write(path, rows):
        path.write_text("key,value\n" + "".join(f"{k},{v}\n" for k, v in rows.items()))

    assert read_journaled(cache, read) == {"photo": "100000"}  # the latest part wins
    assert append_journal(cache, {"photo": "new"}, write).name == "scene.csv.part-100001"
    compact_journal(cache, read_journaled(cache, read), write)
    assert journal_parts(cache) == [] and read(cache) == {"photo": "new"}
    assert (tmp_path / "scene.csv.part-notes").exists()  # not a part: left alone
