"""Contact sheets: numbered grids whose numbers lead to the right files."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from runfolder import add_flag, add_flag_columns, manifest_of, write_run

from curate import cli
from curate.io import CurateError
from curate.preview import SheetConfig, preview, thumbnail


@pytest.fixture
def run(small_dataset: Path, tmp_path: Path) -> Path:
    (small_dataset / "tulips" / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    daisy = sorted((small_dataset / "daisy").glob("*.jpg"))
    shutil.copyfile(daisy[0], small_dataset / "daisy" / "zz_copy.jpg")
    m = manifest_of(small_dataset)
    m = add_flag_columns(m)
    add_flag(m, "roses/" + sorted(p.name for p in (small_dataset / "roses").glob("*.jpg"))[1], "off_class")
    return write_run(tmp_path / "reports" / "flowers", small_dataset, m,
                     groups={"g1": [f"daisy/{daisy[0].name}", "daisy/zz_copy.jpg"]}, kinds={"g1": "exact"})


def _cell_mean(sheet: Image.Image, k: int, c: SheetConfig) -> np.ndarray:
    x = c.gap + (k % c.columns) * (c.thumb + c.gap)
    y = c.gap + (k // c.columns) * (c.thumb + c.gap)
    cell = np.asarray(sheet.crop((x, y + c.thumb // 4, x + c.thumb, y + c.thumb)), dtype=float)
    return cell.reshape(-1, 3).mean(axis=0)


def test_sheets_per_class_number_every_photo_and_show_it(run):
    config = SheetConfig(columns=4, rows=1, thumb=64)
    paths = preview(run, by="label", config=config)
    sheets = run / "sheets" / "label"
    assert sorted(p.name for p in paths) == sorted(p.name for p in sheets.glob("*.png"))
    table = pd.read_csv(sheets / "roses.csv")
    assert table["number"].tolist() == list(range(1, 7))
    assert table["sheet"].tolist() == ["roses_p01.png"] * 4 + ["roses_p02.png"] * 2  # 4 per sheet
    data = Path(run.parent.parent / "flowers")
    # cell k of the sheet shows the photo the CSV names for number k+1
    for page in ("roses_p01.png", "roses_p02.png"):
        with Image.open(sheets / page) as im:
            sheet = im.convert("RGB")
        rows = table[table["sheet"] == page].reset_index(drop=True)
        for k, fp in enumerate(rows["filepath"]):
            thumb = thumbnail(data / fp, config.thumb)
            canvas = Image.new("RGB", (config.thumb, config.thumb), (24, 24, 24))
            canvas.paste(thumb, ((config.thumb - thumb.width) // 2, (config.thumb - thumb.height) // 2))
            expected = np.asarray(canvas.crop((0, config.thumb // 4, config.thumb, config.thumb)),
                                  dtype=float).reshape(-1, 3).mean(axis=0)
            assert np.abs(_cell_mean(sheet, k, config) - expected).max() < 3, (page, k, fp)
    # the unreadable file is on its class's sheet as a grey cell, not a crash
    tulips = pd.read_csv(sheets / "tulips.csv")
    assert "tulips/broken.jpg" in set(tulips["filepath"])


def test_sheets_by_flag_put_duplicates_side_by_side_and_only_filters(run):
    paths = preview(run, by="flag")
    names = {p.name for p in paths}
    assert {"exact_duplicate_p01.png", "off_class_p01.png", "not_image_p01.png"} <= names
    dup = pd.read_csv(run / "sheets" / "flag" / "exact_duplicate.csv")
    assert dup["filepath"].tolist()[1] == "daisy/zz_copy.jpg" and dup["dup_group"].nunique() == 1
    only = preview(run, by="label", only="off_class")
    assert [p.name for p in only] == ["roses_p01.png"]
    assert len(pd.read_csv(run / "sheets" / "label-off_class" / "roses.csv")) == 1
    with pytest.raises(CurateError, match="no photo carries the flag 'nope'"):
        preview(run, only="nope")


def test_sheets_by_cluster_and_cli(run, capsys):
    paths = preview(run, by="cluster")
    assert {p.name for p in paths} >= {"daisy_cluster0_p01.png", "daisy_cluster1_p01.png"}
    assert cli.main(["preview", "--run", str(run), "--by", "cluster", "-q"]) == 0
    printed = capsys.readouterr().out.split()
    assert len(printed) == len(paths) and all(Path(p).exists() for p in printed)
    m = pd.read_csv(run / "manifest.csv").drop(columns=["cluster"])
    m.to_csv(run / "manifest.csv", index=False)
    assert cli.main(["preview", "--run", str(run), "--by", "cluster"]) == 2
    assert "run `curate flag` first" in capsys.readouterr().err
