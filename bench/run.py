"""Run every benchmark in bench/ and print one table of ratios and absolute figures, with the machine.

Usage: .venv/bin/python -m bench [--quick] [--only NAME ...] [--data DIR] [--out JSON]
       (or .venv/bin/python bench/run.py ...)

Each benchmark runs as its own process, one after the other, so none slows another; its output is
parsed for the figures below, and its wall time and peak memory (RSS of its process tree) are recorded.
A benchmark that fails is reported as failed and the others still run.

  scan       bench/scan_bench.py: curate scan vs a plain imagehash loop and vs the reduced-decode floor
  dup        bench/dup_bench.py: near-duplicate index (multi-index hashing) at 10k/100k(/1M) hashes
  merge      bench/merge_bench.py: the scan's dataset-level steps per row (synthetic manifests of 100k(/1M) rows)
  cache      bench/cache_bench.py: flag's per-photo caches saved as a journal vs rewritten after every chunk
  dask       bench/dask_bench.py: --engine dask vs --engine local on the same data
  flag       `curate scan` + `curate flag --fast` on the data (timed), then bench/flag_eval.py on the result
  fiftyone   bench/fiftyone_bench.py on that flagged run folder
  train      bench/train_bench.py pipeline: our cached uint8 input pipeline vs the original post's
  others     cleanvision / imagededup: compared only when installed (they are not dependencies)

--quick makes every benchmark short (one repeat, fewer sizes and images): for a smoke run, not for claims.
Writes bench/results/<date>.json (date = today, UTC): machine, per-benchmark figures, wall time, peak RSS.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
RESULTS = BENCH / "results"
PYTHON = sys.executable
CURATE = str(Path(PYTHON).with_name("curate"))
FLOWERS = ROOT.parent / "shared" / "flower_photos"


@dataclass
class Step:
    """One benchmark's outcome: figures (name -> value, unit, note), wall time, peak memory, status."""

    name: str
    figures: list[tuple[str, Any, str, str]] = field(default_factory=list)
    seconds: float = 0.0
    peak_rss_mb: float = 0.0
    status: str = "ok"
    log_tail: str = ""

    def add(self, name: str, value: Any, unit: str = "", note: str = "") -> None:
        self.figures.append((name, value, unit, note))


# ---------------------------------------------------------------- running and parsing

def machine() -> dict[str, Any]:
    """CPU model, cores, RAM, OS, Python and numpy versions, load average."""
    import numpy as np

    cpu = platform.processor() or platform.machine()
    ram_gb = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                ram_gb = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "ram_gb": ram_gb, "os": platform.platform(),
            "python": platform.python_version(), "numpy": np.__version__,
            "load_average": [round(x, 1) for x in os.getloadavg()]}


def run_command(cmd: list[str], step: Step, timeout: float | None = None) -> str:
    """Run `cmd` from the repository root; record wall time and peak RSS (of its whole waited-for tree)."""
    with tempfile.TemporaryFile("w+") as log:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, text=True)
        try:
            deadline = None if timeout is None else time.monotonic() + timeout
            while True:
                pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
                if pid:
                    break
                if deadline is not None and time.monotonic() > deadline:
                    proc.kill()
                    pid, status, usage = os.wait4(proc.pid, 0)
                    step.status = f"timed out after {timeout:.0f} s"
                    break
                time.sleep(0.2)
        except BaseException:
            proc.kill()
            raise
        proc.returncode = os.waitstatus_to_exitcode(status)
        step.seconds += time.perf_counter() - t0
        step.peak_rss_mb = max(step.peak_rss_mb, usage.ru_maxrss / 1024)
        log.seek(0)
        out = log.read()
    step.log_tail = out[-4000:]
    if proc.returncode != 0 and step.status == "ok":
        step.status = f"failed (exit {proc.returncode}): {' '.join(cmd[1:3])}"
    return out


def number(pattern: str, text: str, group: int = 1) -> float | None:
    m = re.search(pattern, text, re.MULTILINE)
    return float(m.group(group)) if m else None


# ---------------------------------------------------------------- the benchmarks

def bench_scan(args, ctx: dict) -> Step:
    step = Step("scan")
    out = run_command([PYTHON, str(BENCH / "scan_bench.py"), args.data, "--repeats", "1" if args.quick else "3"],
                      step)
    for key, label in (("curate scan, cold cache", "scan, cold cache"), ("curate scan, warm cache", "scan, warm cache"),
                       (r"\(a\) plain imagehash loop", "(a) plain imagehash loop"),
                       (r"\(b\) reduced decode floor", "(b) reduced-decode floor")):
        step.add(f"{label}: wall", number(rf"{key}\s+([\d.]+)\s+([\d.]+)", out), "s")
        step.add(f"{label}: CPU", number(rf"{key}\s+([\d.]+)\s+([\d.]+)", out, 2), "s", "process + workers")
    step.add("(a) / scan (wall)", number(r"\(a\) / scan\s+=\s+([\d.]+)", out), "x", "target >= 3")
    step.add("scan / (b) (wall)", number(r"scan / \(b\)\s+=\s+([\d.]+)", out), "x", "target <= 1.5")
    step.add("scan / warm (wall)", number(r"scan / warm\s+=\s+([\d.]+)", out), "x", "target >= 10")
    cpu_line = re.search(r"^\s+\(a\) / scan\s+=\s+([\d.]+)\s+scan / \(b\) = ([\d.]+)\s+scan / warm = ([\d.]+)",
                         out, re.MULTILINE)
    if cpu_line:
        step.add("(a) / scan (CPU)", float(cpu_line.group(1)), "x")
        step.add("scan / (b) (CPU)", float(cpu_line.group(2)), "x")
    return step


def bench_dup(args, ctx: dict) -> Step:
    step = Step("dup")
    sizes = ["10000", "100000"] if args.quick else ["10000", "100000", "1000000"]
    out = run_command([PYTHON, str(BENCH / "dup_bench.py"), "--sizes", *sizes], step)
    for m in re.finditer(r"^\s*(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+([\d.]+)\s*$", out, re.MULTILINE):
        n, seconds = int(m.group(1)), float(m.group(5))
        step.add(f"group {n:,} hashes", seconds, "s", f"{1e6 * seconds / n:.2f} us/hash, {m.group(2)} chunks, "
                                                    f"{int(m.group(3)):,} pairs")
    brute = re.search(r"all-pairs comparison: ([\d.]+) s, same groups: (\w+)", out)
    first = re.search(r"^\s*(\d+)\s+\d+\s+\d+\s+\d+\s+([\d.]+)\s*$", out, re.MULTILINE)
    if brute and first:
        step.add(f"all-pairs / index at {int(first.group(1)):,}", round(float(brute.group(1)) /
                 max(float(first.group(2)), 1e-3), 1), "x", f"same groups: {brute.group(2)}")
    return step


def bench_dask(args, ctx: dict) -> Step:
    step = Step("dask")
    js = Path(ctx["tmp"]) / "dask.json"
    run_command([PYTHON, str(BENCH / "dask_bench.py"), args.data, "--repeats", "1" if args.quick else "3",
                 "--json", str(js)], step)
    if js.exists():
        r = json.loads(js.read_text())
        step.add("local engine: wall", r["wall_s"]["local"], "s", f"{r['files']} files, {r['workers']} workers")
        step.add("dask engine, own LocalCluster: wall", r["wall_s"]["dask"], "s", "cluster start included")
        step.add("dask engine, running scheduler: wall", r["wall_s"]["dask-warm"], "s")
        step.add("dask / local", r["ratio_dask_over_local"], "x")
        step.add("dask (running scheduler) / local", r["ratio_dask_warm_over_local"], "x")
        step.add("manifests identical", r["manifests_identical"], "")
        step.add("scan CPU per file (local engine)", r["local_cpu_ms_per_file"], "ms", "process + workers")
        step.add("manifest row in memory", r["bytes_per_row_as_dicts"], "B",
                 f"as dicts; {r['bytes_per_row_as_dataframe']} B as a DataFrame row")
        ctx["dask"] = r
    return step


def bench_merge(args, ctx: dict) -> Step:
    step = Step("merge")
    manifest = ROOT / "reports" / "flower_photos" / "manifest.csv"
    if not manifest.exists():
        step.status = f"skipped: needs {manifest.relative_to(ROOT)} (run `curate scan {args.data}`)"
        return step
    sizes = ["100000"] if args.quick else ["100000", "1000000"]
    out = run_command([PYTHON, str(BENCH / "merge_bench.py"), "--sizes", *sizes, "--manifest", str(manifest)], step)
    for line in out.splitlines():
        if line.startswith("RESULT "):
            r = json.loads(line[len("RESULT "):])
            step.add(f"dataset-level steps, {r['rows']:,} rows", r["total_s"], "s",
                     f"{r['us_per_row']} us/row, duplicates {r['seconds']['duplicates (exact + near index)']} s")
            step.add(f"peak memory per row, {r['rows']:,} rows", r["peak_bytes_per_row"], "B",
                     f"{r['bytes_per_row_before_merge']} B/row holding the rows before the merge")
    return step


def bench_cache(args, ctx: dict) -> Step:
    step = Step("cache")
    sizes = ["3000"] if args.quick else ["3000", "20000"]
    out = run_command([PYTHON, str(BENCH / "cache_bench.py"), "--sizes", *sizes,
                       "--repeats", "1" if args.quick else "3"], step)
    for m in re.finditer(r"^n=(\d+) ratio rewrite/journal: time ([\d.]+)x, bytes ([\d.]+)x$", out, re.MULTILINE):
        step.add(f"rewrite / journal, {int(m.group(1)):,} embeddings", float(m.group(2)), "x",
                 f"bytes written {m.group(3)}x")
    return step


def bench_flag(args, ctx: dict) -> Step:
    step = Step("flag")
    run = Path(ctx["tmp"]) / "run"
    run_command([CURATE, "scan", args.data, "--out", str(run), "-q"], step)
    scan_s = step.seconds
    if step.status != "ok":
        return step
    t0 = step.seconds
    run_command([CURATE, "flag", "--run", str(run), "--fast", "-q"], step)
    flag_s = step.seconds - t0
    if step.status != "ok":
        return step
    n = json.loads((run / "scan.json").read_text())["files"]
    step.add("curate scan (process)", round(scan_s, 2), "s", f"{n} files")
    step.add("curate flag --fast (process)", round(flag_s, 2), "s", f"{1000 * flag_s / n:.1f} ms per image")
    ctx["flag_run"], ctx["flag_ms_per_image"] = run, 1000 * flag_s / n
    js = Path(ctx["tmp"]) / "flag_eval.json"
    sub = Step("flag_eval")
    run_command([PYTHON, str(BENCH / "flag_eval.py"), str(run), "--json", str(js)], sub)
    if js.exists():
        r = json.loads(js.read_text())
        o = r["overall"]
        step.add("label_quality AP vs hand audit", round(o["ap"], 3), "",
                 f"95% bootstrap {o['ap_95'][0]:.3f}-{o['ap_95'][1]:.3f}, base rate "
                 f"{o.get('base_rate', float('nan')):.3f}, {o['positives']} positives")
        step.add("recall@2P", round(o["recall_at_2p"], 3), "")
        if "flag_off_class" in r:
            f = r["flag_off_class"]
            step.add("off_class flag precision / recall", f"{f['precision']:.3f} / {f['recall']:.3f}", "",
                     f"{f['flagged']} flagged")
    else:
        step.status = f"flag_eval {sub.status}"
        step.log_tail = sub.log_tail
    return step


def bench_fiftyone(args, ctx: dict) -> Step:
    step = Step("fiftyone")
    if "flag_run" not in ctx:
        step.status = "skipped: needs the flagged run of the flag benchmark"
        return step
    out = run_command([PYTHON, str(BENCH / "fiftyone_bench.py"), str(ctx["flag_run"])], step)
    # its timings are a pandas Series printed as "label    seconds" lines, whatever the labels are
    for m in re.finditer(r"^(\S.*?)\s{2,}([\d.]+)\s*$", out, re.MULTILINE):
        step.add(m.group(1), float(m.group(2)), "s")
    step.add("first build / floor", number(r"first build / floor: ([\d.]+)x", out), "x")
    return step


def bench_train(args, ctx: dict) -> Step:
    step = Step("train")
    jsonl = RESULTS / "train_bench.jsonl"
    lines_before = len(jsonl.read_text().splitlines()) if jsonl.exists() else 0
    extra = ["--images", "256", "--repeats", "1"] if args.quick else []
    run_command([PYTHON, str(BENCH / "train_bench.py"), "pipeline", *extra], step)
    lines = jsonl.read_text().splitlines() if jsonl.exists() else []
    if len(lines) > lines_before:
        r = json.loads(lines[-1])
        step.add("post's pipeline: training", r["median_post"], "img/s", f"{r['images']} images, {r['model']}")
        step.add("ours: training", r["median_ours"], "img/s")
        step.add("ours / post", r["ratio_ours_over_post"], "x")
        step.add("post's pipeline alone", r["post_pipeline_alone_images_per_s"], "img/s")
        step.add("ours: cold / warm cache load", f"{r['ours_cold_cache_load_s']} / {r['ours_warm_cache_load_s']}",
                 "s")
    elif step.status == "ok":
        step.status = "no result line written"
    return step


KNOWN_SCRIPTS = {"scan_bench.py", "dup_bench.py", "merge_bench.py", "cache_bench.py", "dask_bench.py", "flag_eval.py",
                 "fiftyone_bench.py", "train_bench.py", "run.py", "__main__.py", "__init__.py"}
# scripts this suite leaves to a person, and why
BY_HAND = {"flag_ablation.py": "needs a full `curate flag` run folder (K-fold ViT, ~17 min): "
                               "bench/flag_ablation.py RUN_DIR"}


def bench_others(args, ctx: dict) -> Step:
    step = Step("others")
    for script in sorted(p.name for p in BENCH.glob("*.py") if p.name not in KNOWN_SCRIPTS):
        step.add(f"bench/{script}", "run by hand" if script in BY_HAND else "not run by this suite", "",
                 BY_HAND.get(script, "new script: add it to bench/run.py"))
    for pkg in ("cleanvision", "imagededup"):
        step.add(pkg, "installed, no comparison script yet" if importlib.util.find_spec(pkg) else "not installed",
                 "", "optional comparison")
    return step


BENCHMARKS: dict[str, Callable[[argparse.Namespace, dict], Step]] = {
    "scan": bench_scan, "dup": bench_dup, "merge": bench_merge, "cache": bench_cache, "dask": bench_dask,
    "flag": bench_flag,
    "fiftyone": bench_fiftyone, "train": bench_train, "others": bench_others,
}


# ---------------------------------------------------------------- output

def _fmt(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:,.3f}" if abs(value) < 10 else f"{value:,.1f}"
    return str(value)


def print_table(mach: dict, steps: list[Step], quick: bool) -> None:
    print(f"\nmachine: {mach['cpu']}; {mach['cores']} cores; {mach['ram_gb']} GB RAM; python {mach['python']}; "
          f"numpy {mach['numpy']}; load average at start {mach['load_average']}"
          + ("; --quick (one repeat, fewer sizes)" if quick else ""))
    rows = [("benchmark", "figure", "value", "unit", "note")]
    for s in steps:
        rows.append((s.name, f"[{s.status}]", f"{s.seconds:.0f}", "s", f"peak RSS {s.peak_rss_mb:,.0f} MB"))
        rows += [("", name, _fmt(value), unit, note) for name, value, unit, note in s.figures]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for r in rows:
        print("  ".join(c.ljust(w) if i != 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r[:4], widths,
                                                                                          strict=True)))
              + ("  " + r[4] if r[4] else ""))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="short runs: one repeat, fewer sizes and images")
    ap.add_argument("--only", nargs="+", choices=list(BENCHMARKS), metavar="NAME",
                    help=f"run only these ({', '.join(BENCHMARKS)})")
    ap.add_argument("--data", default=str(FLOWERS),
                    help="dataset for scan/dask/flag (default: ../shared/flower_photos)")
    ap.add_argument("--out", metavar="JSON", help="results file (default: bench/results/<date>.json)")
    args = ap.parse_args(argv)

    mach = machine()
    steps: list[Step] = []
    names = args.only or list(BENCHMARKS)
    if "fiftyone" in names and "flag" not in names:
        names = ["flag", *names]  # it benchmarks the flagged run folder the flag step leaves
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    with tempfile.TemporaryDirectory(prefix="curate-bench-") as tmp:
        ctx: dict[str, Any] = {"tmp": tmp}
        for name in (n for n in BENCHMARKS if n in names):
            print(f"[{time.strftime('%H:%M:%S')}] {name} ...", flush=True)
            try:
                step = BENCHMARKS[name](args, ctx)
            except Exception as exc:  # one broken benchmark must not hide the others' figures
                step = Step(name, status=f"error: {type(exc).__name__}: {exc}")
            steps.append(step)
            print(f"[{time.strftime('%H:%M:%S')}] {name}: {step.status} ({step.seconds:.0f} s)", flush=True)
            if step.status != "ok" and step.log_tail:
                print("  " + step.log_tail[-1500:].replace("\n", "\n  "), flush=True)
    mach["load_average_end"] = [round(x, 1) for x in os.getloadavg()]
    print_table(mach, steps, args.quick)

    out = Path(args.out) if args.out else RESULTS / f"{time.strftime('%Y-%m-%d', time.gmtime())}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {"started": started, "quick": args.quick, "data": args.data, "machine": mach,
              "benchmarks": {s.name: {"status": s.status, "seconds": round(s.seconds, 1),
                                      "peak_rss_mb": round(s.peak_rss_mb, 1),
                                      "figures": [{"name": n, "value": v, "unit": u, "note": note}
                                                  for n, v, u, note in s.figures],
                                      **({"log_tail": s.log_tail} if s.status != "ok" else {})}
                             for s in steps}}
    tmp_out = out.with_name(f".{out.name}.tmp")
    tmp_out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    os.replace(tmp_out, out)
    print(f"\nwritten: {out}")
    return 0 if all(s.status == "ok" or s.status.startswith("skipped") for s in steps) else 1


if __name__ == "__main__":
    sys.exit(main())
