"""The `curate` command line contract: exit 0 on success, 1 on a failed run, 2 on a usage or input error (130 on
Ctrl-C); errors on stderr, one line, naming the command; -v/-q accepted by every subcommand, before or after it."""

from __future__ import annotations

import re

import pytest
from badinputs import curate, run_cli
from conftest import make_dataset

from curate import cli
from train.data import cache_root


def _subcommands() -> dict[str, object]:
    parser = cli.build_parser()
    action = next(a for a in parser._actions if a.dest == "command")
    return action.choices


# the fewest arguments each subcommand parses with; a new subcommand must be added here
MINIMAL = {
    "fetch": [], "scan": ["DATA"], "flag": [], "app": [], "review-status": [], "export": [],
    "train": ["--manifest", "m.csv", "--data", "D", "--out", "o"], "predict": ["m.keras", "x.jpg"],
    "compare": ["--raw", "r.csv", "--clean", "c.csv"], "report": [], "preview": [], "run": [],
}


def test_every_subcommand_accepts_verbose_and_quiet_before_or_after_it():
    parser = cli.build_parser()
    assert set(_subcommands()) == set(MINIMAL), "update MINIMAL for new subcommands"
    for cmd, rest in MINIMAL.items():
        for flag, verbose, quiet in (("-v", True, False), ("--verbose", True, False), ("-q", False, True),
                                     ("--quiet", False, True)):
            for argv in ([cmd, *rest, flag], [flag, cmd, *rest]):
                args = parser.parse_args(argv)
                assert (args.command, args.verbose, args.quiet) == (cmd, verbose, quiet), argv
        args = parser.parse_args([cmd, *rest])
        assert (args.verbose, args.quiet) == (False, False), cmd


def test_usage_errors_exit_2_on_stderr():
    for argv in ([], ["scan"], ["no-such-command"], ["scan", "D", "--workers", "many"], ["scan", "D", "-v", "-q"],
                 ["compare", "--raw", "r.csv"], ["run", "--preset", "huge"]):
        r = curate(*argv)
        assert r.returncode == 2, (argv, r.stderr)
        assert r.stdout == "" and r.stderr.strip(), argv
        assert "Traceback" not in r.stderr, argv


def test_success_input_error_and_failed_run_exit_0_2_1(tmp_path):
    data = make_dataset(tmp_path / "flowers", per_class=2, classes=["daisy", "roses"])
    ok = curate("scan", str(data), "--out", str(tmp_path / "run"), "-q")
    assert ok.returncode == 0 and ok.stdout == "" and ok.stderr == "", ok.stderr
    # input error: one line naming the command and the file
    bad = curate("scan", str(tmp_path / "missing"), "-q")
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.splitlines() == [f"curate scan: error: {tmp_path / 'missing'}: no such folder"]
    # failed run: the run folder cannot be created (a file is in the way); one line, no traceback...
    (tmp_path / "blocker").write_text("")
    failed = curate("scan", str(data), "--out", str(tmp_path / "blocker" / "run"))
    assert failed.returncode == 1 and failed.stdout == ""
    last = failed.stderr.strip().splitlines()[-1]
    assert last.startswith("curate scan: failed: NotADirectoryError") and "rerun with -v" in last
    assert "Traceback" not in failed.stderr
    # ... and with -v the traceback too
    verbose = curate("scan", str(data), "--out", str(tmp_path / "blocker" / "run"), "-v")
    assert verbose.returncode == 1 and "Traceback" in verbose.stderr


def test_quiet_silences_progress_and_verbose_shows_only_curates_own_lines(tmp_path):
    data = make_dataset(tmp_path / "flowers", per_class=3, classes=["daisy", "roses"])
    run = tmp_path / "run"
    assert run_cli(["scan", str(data), "--out", str(run), "-q"]) == (0, "", "")
    rc, _, normal = run_cli(["scan", str(data), "--out", str(run), "--no-cache"])
    assert rc == 0 and "scan: 6 files in 2 classes" in normal and "scan:" in normal
    rc, out, quiet = run_cli(["export", "--run", str(run), "-q"])
    assert (rc, quiet) == (0, "")
    rc, out, loud = run_cli(["-v", "report", "--run", str(run)])
    assert rc == 0 and f"report: {run / 'index.html'}" in loud
    # matplotlib, PIL and friends log at DEBUG when asked; -v must not turn that on
    assert "findfont" not in loud and "matplotlib" not in loud and "STREAM" not in loud, loud[:500]


def test_train_and_predict_print_only_curates_own_lines(tmp_path):
    """TensorFlow writes start-up lines (oneDNN, CUDA, "failed call to cuInit" without a GPU) to stderr before
    its logging is set up, and Keras its progress to stdout: with -q a successful train and predict print
    nothing on stderr, and without it stdout still carries results only."""
    data = make_dataset(tmp_path / "flowers", per_class=6, classes=["daisy", "roses", "tulips"])
    assert curate("scan", str(data), "--out", str(tmp_path / "run"), "-q").returncode == 0
    trained = curate("train", "--manifest", str(tmp_path / "run" / "manifest.csv"), "--data", str(data),
                     "--out", str(tmp_path / "model"), "--preset", "tiny", "--epochs", "1", "-q")
    assert (trained.returncode, trained.stderr) == (0, ""), trained.stderr[:2000]
    predicted = curate("predict", str(tmp_path / "model" / "model.keras"), str(data / "roses"), "-q")
    assert (predicted.returncode, predicted.stderr) == (0, ""), predicted.stderr[:2000]
    assert len(predicted.stdout.splitlines()) == 6
    # without -q the device is said in curate's own words, since TensorFlow's notices are held back
    loud = curate("train", "--manifest", str(tmp_path / "run" / "manifest.csv"), "--data", str(data),
                  "--out", str(tmp_path / "model2"), "--preset", "tiny", "--epochs", "1")
    assert loud.returncode == 0 and re.search(r"unreadable skipped; on (CPU \(\d+ cores|\S)", loud.stderr), loud.stderr
    assert "I0000" not in loud.stderr and "cuInit" not in loud.stderr
    # Keras prints its per-epoch progress on stdout; curate keeps stdout for results
    assert loud.stdout == "" and "val_acc:" in loud.stderr


def test_quiet_flag_with_the_person_detectors_prints_nothing(tmp_path):
    """The first TFLite interpreter in a process writes "INFO: Created TensorFlow Lite XNNPACK delegate"
    to stderr from native code; with -q a successful flag prints nothing there but its own warnings."""
    data = make_dataset(tmp_path / "flowers", per_class=10, classes=["daisy", "roses"])
    assert curate("scan", str(data), "--out", str(tmp_path / "run"), "-q").returncode == 0
    flagged = curate("flag", "--fast", "--run", str(tmp_path / "run"), "-q")
    assert (flagged.returncode, flagged.stdout) == (0, ""), flagged.stderr[:2000]
    # what is left on stderr is curate's own warnings (20 photos may be too few to beat chance)
    assert all(line.startswith("flag: ") for line in flagged.stderr.splitlines()), flagged.stderr[:2000]
    assert (tmp_path / "run" / "cache" / "scene.csv").is_file()  # the detectors did run
    # ... and the pretrained network was converted to TFLite (quietly) and run by the interpreter
    assert list(cache_root().glob("mobilenet_v2_v*.tflite"))  # (kept once per machine)
    # without the detectors the network's interpreter is the process's first: its XNNPACK line is held back too
    (tmp_path / "run" / "cache" / "mobilenet_v2.npz").unlink()
    plain = curate("flag", "--fast", "--no-scene", "--run", str(tmp_path / "run"), "-q")
    assert (plain.returncode, plain.stdout) == (0, ""), plain.stderr[:2000]
    assert all(line.startswith("flag: ") for line in plain.stderr.splitlines()), plain.stderr[:2000]
    assert (tmp_path / "run" / "cache" / "mobilenet_v2.npz").is_file()


@pytest.mark.parametrize("cmd", ["flag", "export", "report", "preview", "review-status"])
def test_a_missing_run_folder_is_an_input_error_for_every_stage(cmd, tmp_path):
    rc, out, err = run_cli([cmd, "--run", str(tmp_path / "nowhere"), "-q"])
    assert rc == 2 and out == ""
    assert err.strip() == f"curate {cmd}: error: {tmp_path / 'nowhere'}: no manifest.csv here; run " \
                          f"`curate scan DATA --out {tmp_path / 'nowhere'}` first"
