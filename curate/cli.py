"""The `curate` command line: argument parsing, logging and exit codes; the work is in the API.

Exit codes: 0 success, 1 a run that failed (an unexpected exception: one line, the traceback with -v),
2 a usage or input error, 130 interrupted (Ctrl-C). Errors go to stderr; -v/-q work before or after the
subcommand; -v shows curate's debug lines, not those of the libraries it uses.
Heavy libraries (keras, fiftyone) are imported inside the subcommand that needs them, so
`curate --help` and `curate scan` start fast.
"""

from __future__ import annotations

import argparse
import logging
import sys
import traceback
from pathlib import Path

from curate.io import CurateError

log = logging.getLogger("curate")


def _share(text: str) -> float:
    """argparse type: a share of the photos, 0 to 1."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"{text}: expected a share of the photos, 0 to 1 (e.g. 0.07)")
    return value


def _add_common(p: argparse.ArgumentParser, top: bool = False) -> None:
    # Subcommands suppress the default so `curate -q scan` and `curate scan -q` both work.
    default = False if top else argparse.SUPPRESS
    g = p.add_mutually_exclusive_group()
    g.add_argument("-v", "--verbose", action="store_true", default=default, help="print debug messages")
    g.add_argument("-q", "--quiet", action="store_true", default=default,
                   help="print only warnings and errors, no progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="curate",
        description="Audit and clean an image-classification dataset (one folder per class): "
        "scan, flag, review in FiftyOne, export a cleaned manifest, retrain and report.",
    )
    _add_common(parser, top=True)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("fetch", help="put the flower_photos dataset in place (download or copy)")
    p.add_argument("--from", dest="source", metavar="PATH",
                   help="a folder of class folders or a .tgz to use instead of downloading")
    p.add_argument("--dest", default="flower_photos", help="where to put the dataset (default: flower_photos)")
    _add_common(p)

    p = sub.add_parser("scan", help="hash, decode and check every image; write manifest.csv")
    p.add_argument("data", metavar="DATA", help="dataset folder: one sub-folder per class, or train/, val/ "
                   "and test/ folders each holding one sub-folder per class (the split is kept)")
    p.add_argument("--out", metavar="DIR", help="run folder (default: reports/<dataset name>/)")
    p.add_argument("--workers", type=int, metavar="N", help="worker processes (default: all cores)")
    p.add_argument("--engine", choices=["local", "dask"], default="local",
                   help="local process pool (default) or Dask tasks")
    p.add_argument("--scheduler", metavar="ADDRESS",
                   help="with --engine dask: an existing Dask scheduler (default: a LocalCluster)")
    p.add_argument("--no-cache", action="store_true", help="ignore the per-file cache of earlier scans")
    _add_common(p)

    p = sub.add_parser("flag", help="score every photo for label issues and off-class content")
    p.add_argument("--run", metavar="DIR", help="run folder written by `curate scan`")
    p.add_argument("--folds", type=int, default=5, metavar="K", help="cross-validation folds (default: 5)")
    p.add_argument("--embeddings", default=None, metavar="NAME",
                   help="representation: 'vit' (own ViT, K-fold; the offline default), "
                   "'keras:<keras.applications name>' (pretrained ImageNet weights), or 'features'")
    p.add_argument("--fast", action="store_true",
                   help="no K-fold ViT: cheap features, the scene measures and the bundled pretrained network; "
                   "about 2 minutes for 3,000 photos on 2 cores (the full mode about 30), and on flower_photos "
                   "as accurate (docs/flagging.md)")
    p.add_argument("--no-scene", action="store_true",
                   help="leave out the scene measures: people, straight edges, depth of field, colour, "
                   "foliage (q_face, q_body, q_structure, q_focus, q_colour, q_foliage, and the rule that a "
                   "confidently found face ranks a photo first): for datasets whose classes are "
                   "man-made objects or not colourful close-ups (a class with someone in at least 30%% of "
                   "its photos is taken to be about people without it: finding a person counts against "
                   "none of its photos)")
    p.add_argument("--no-pretrained", action="store_true",
                   help="leave out the bundled ImageNet network (MobileNetV2, curate/pretrained.py): no "
                   "q_typical (how unlike the rest of its folder a photo looks), and look-alikes found by the "
                   "cheap features instead; saves about a minute per 3,000 photos on 2 cores the first time")
    p.add_argument("--retrain", action=argparse.BooleanOptionalAction, default=False,
                   help="train the K-fold ViT a second time, same folds, without the photos the first pass "
                   "found most suspicious, and score every photo again with that cleaner model (confident "
                   "learning's prune and retrain): on flower_photos label_quality AP 0.758 instead of 0.756, "
                   "for half again the time (default: off, the first K-fold ViT scores alone)")
    p.add_argument("--max-off-class", type=_share, metavar="SHARE",
                   help="flag at most this share of the photos off_class (default: 0.2). The flag takes the "
                   "lowest label_quality photos, as many as cleanlab estimates are label issues, up to this "
                   "cap, and none of a rare class the models did not learn (at most 30 photos); a "
                   "smaller share gives a shorter review list with higher precision "
                   "(docs/flagging.md). label_quality (the ranking) does not depend on it")
    _add_common(p)

    p = sub.add_parser("app", help="build the FiftyOne dataset and its saved views; launch the App")
    p.add_argument("--run", metavar="DIR", help="run folder")
    p.add_argument("--port", type=int, default=5151, help="App port (default: 5151)")
    p.add_argument("--address", default="127.0.0.1", help="App address (default: 127.0.0.1)")
    p.add_argument("--no-launch", action="store_true", help="only build or update the dataset")
    _add_common(p)

    p = sub.add_parser("review-status", help="how many flagged samples have been reviewed in the App")
    p.add_argument("--run", metavar="DIR", help="run folder")
    _add_common(p)

    p = sub.add_parser("export", help="write cleaned.csv and removed.csv by a named policy")
    p.add_argument("--run", metavar="DIR", help="run folder")
    p.add_argument("--policy", default="default", metavar="NAME", help="cleaning policy; `--policy list` lists them")
    p.add_argument("--out", metavar="CSV", help="cleaned manifest path (default: <run>/cleaned.csv)")
    p.add_argument("--columns", metavar="COL,COL", default="",
                   help="manifest columns to add to cleaned.csv after filepath,label,split (e.g. sha256,label_quality)")
    _add_common(p)

    p = sub.add_parser("train", help="train the Keras ViT on a manifest")
    p.add_argument("--manifest", required=True, metavar="CSV", help="manifest with filepath, label (, split)")
    p.add_argument("--data", required=True, metavar="DATA", help="data root the manifest's paths are relative to")
    p.add_argument("--out", required=True, metavar="DIR", help="where to write the model, logs and metrics")
    p.add_argument("--preset", default="cpu", choices=["seed", "cpu", "gpu", "tiny"], help="recipe (default: cpu)")
    p.add_argument("--epochs", type=int, metavar="N", help="override the preset's epochs")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="random seed (default: 0)")
    p.add_argument("--limit", type=int, metavar="N", help="train on a stratified sample of N rows")
    _add_common(p)

    p = sub.add_parser("predict", help="print the predicted class and probabilities of images")
    p.add_argument("model", metavar="MODEL", help="a .keras model written by `curate train`")
    p.add_argument("images", nargs="+", metavar="IMAGE",
                   help="an image file, or a folder: every image under it (sorted; hidden files left out). "
                        "One line per image on stdout: path, predicted class, each class's probability")
    _add_common(p)

    p = sub.add_parser("compare", help="train on raw and cleaned manifests; compare on the same test photos")
    p.add_argument("--raw", required=True, metavar="MANIFEST", help="the raw manifest (e.g. <run>/manifest.csv)")
    p.add_argument("--clean", required=True, metavar="CLEANED", help="the cleaned manifest (e.g. <run>/cleaned.csv)")
    p.add_argument("--data", metavar="DATA", help="data root (default: the run's scanned folder)")
    p.add_argument("--run", metavar="DIR", help="run folder to write compare.json into")
    p.add_argument("--preset", default="cpu", choices=["seed", "cpu", "gpu", "tiny"],
                   help="trainer recipe (default: cpu)")
    p.add_argument("--seeds", type=int, default=3, metavar="N", help="seeds per manifest (default: 3)")
    p.add_argument("--epochs", type=int, metavar="N", help="override the preset's epochs")
    _add_common(p)

    p = sub.add_parser("report", help="write index.html, report.md and metrics.json for a run")
    p.add_argument("--run", metavar="DIR", help="run folder")
    _add_common(p)

    p = sub.add_parser("preview", help="contact sheets: numbered thumbnail grids per class, flag or cluster")
    p.add_argument("--run", metavar="DIR", help="run folder")
    p.add_argument("--by", choices=["label", "flag", "cluster"], default="label",
                   help="one sheet set per class, per flag or per cluster (default: label)")
    p.add_argument("--only", metavar="FLAG", help="only photos carrying this flag")
    _add_common(p)

    p = sub.add_parser("run", help="the main job: fetch, scan, flag, export, compare, report")
    p.add_argument("data", nargs="?", default="flower_photos", metavar="DATA",
                   help="dataset folder (default: flower_photos, fetched if missing)")
    p.add_argument("--from", dest="source", metavar="PATH", help="where to fetch the dataset from if missing")
    p.add_argument("--out", metavar="DIR", help="run folder (default: reports/<dataset name>/)")
    p.add_argument("--fast", action="store_true", help="flag without the K-fold ViT (see `curate flag --help`)")
    p.add_argument("--preset", default="cpu", choices=["seed", "cpu", "gpu", "tiny"],
                   help="trainer recipe for compare (default: cpu)")
    p.add_argument("--seeds", type=int, default=3, metavar="N", help="seeds per manifest for compare (default: 3)")
    p.add_argument("--epochs", type=int, metavar="N", help="override the compare preset's epochs")
    p.add_argument("--skip-compare", action="store_true", help="do not retrain (no before/after accuracy)")
    p.add_argument("--max-off-class", type=_share, metavar="SHARE",
                   help="flag (and so the default export removes) at most this share of the photos off_class "
                   "(default: 0.2; see `curate flag --help`)")
    p.add_argument("--no-scene", action="store_true",
                   help="flag without the scene measures (see `curate flag --help`)")
    _add_common(p)
    return parser


def _own_or_warning(record: logging.LogRecord) -> bool:
    # -v is for curate's own debug lines; libraries (matplotlib, PIL, fiftyone) only get through with warnings
    return record.levelno >= logging.WARNING or record.name == "curate" or record.name.startswith("curate.")


def _setup_logging(args: argparse.Namespace) -> None:
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="%(message)s", stream=sys.stderr, force=True)
    for handler in logging.getLogger().handlers:
        handler.addFilter(_own_or_warning)


def _dispatch(args: argparse.Namespace) -> int:
    progress = not args.quiet
    cmd = args.command
    if cmd == "fetch":
        from curate.fetch import fetch

        dest = fetch(args.source, Path(args.dest), progress=progress)
        print(dest)
    elif cmd == "scan":
        from curate.scan import scan

        scan(args.data, out=args.out, workers=args.workers, engine=args.engine, scheduler=args.scheduler,
             use_cache=not args.no_cache, progress=progress)
    elif cmd == "flag":
        from curate.labels import flag, flag_config

        config = flag_config(scene=not args.no_scene, retrain_pruned=args.retrain,
                             max_off_class=args.max_off_class, pretrained=not args.no_pretrained)
        flag(args.run, folds=args.folds, embeddings=args.embeddings, fast=args.fast, progress=progress,
             config=config)
    elif cmd == "app":
        from curate.fiftyone_bridge import app

        app(args.run, port=args.port, address=args.address, launch=not args.no_launch)
    elif cmd == "review-status":
        from curate.fiftyone_bridge import review_status

        print(review_status(args.run))
    elif cmd == "export":
        from curate.export import export

        export(args.run, policy=args.policy, out=args.out, columns=[c for c in args.columns.split(",") if c])
    elif cmd == "train":
        from train.fit import train

        train(args.manifest, args.data, args.out, preset=args.preset, epochs=args.epochs,
              seed=args.seed, limit=args.limit, progress=progress)
    elif cmd == "predict":
        from train.fit import predict_images

        for line in predict_images(args.model, args.images):
            print(line)
    elif cmd == "compare":
        from curate.compare import compare

        compare(args.raw, args.clean, data=args.data, run=args.run, preset=args.preset,
                seeds=args.seeds, epochs=args.epochs, progress=progress)
    elif cmd == "report":
        from curate.report import report

        print(report(args.run))
    elif cmd == "preview":
        from curate.preview import preview

        for path in preview(args.run, by=args.by, only=args.only):
            print(path)
    elif cmd == "run":
        from curate.pipeline import run

        print(run(args.data, source=args.source, out=args.out, fast=args.fast, preset=args.preset,
                  seeds=args.seeds, compare=not args.skip_compare, progress=progress, epochs=args.epochs,
                  scene=not args.no_scene, max_off_class=args.max_off_class))  # the report, as `report` prints it
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    _setup_logging(args)
    try:
        return _dispatch(args)
    except CurateError as exc:
        print(f"curate {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"curate {args.command}: interrupted; finished outputs are kept, rerun to resume", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 -- a failed run: one line on stderr, exit 1 (the traceback with -v)
        if args.verbose:
            traceback.print_exc(file=sys.stderr)
        hint = "" if args.verbose else " (rerun with -v for the traceback)"
        print(f"curate {args.command}: failed: {type(exc).__name__}: {exc}{hint}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
