"""`curate fetch`: copy from a folder, unpack a .tgz safely, fail clearly offline; the source is never written."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest
from conftest import make_dataset, tree_fingerprint

import curate.fetch
from curate import cli
from curate.fetch import fetch, has_dataset
from curate.io import CurateError


def _tgz(path: Path, folder: Path, arcname: str) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        tar.add(folder, arcname=arcname)
    return path


def test_fetch_copies_a_folder_and_never_writes_the_source(tmp_path: Path) -> None:
    src = make_dataset(tmp_path / "src", per_class=2)
    (src / "LICENSE.txt").write_text("licence text")
    outside = tmp_path / "secret.jpg"
    outside.write_bytes(b"not to be copied")
    (src / "daisy" / "link.jpg").symlink_to(outside)
    before = tree_fingerprint(src)

    dest = tmp_path / "flower_photos"
    dest.mkdir()
    (dest / "README.md").write_text("kept")  # the repository's placeholder README stays
    assert fetch(str(src), dest, progress=False) == dest
    assert tree_fingerprint(src) == before
    copied = sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file())
    expected = sorted(p.relative_to(src).as_posix() for p in src.rglob("*") if p.is_file() and not p.is_symlink())
    assert copied == sorted(expected + ["README.md"])
    assert (dest / "README.md").read_text() == "kept"
    assert not (dest / "daisy" / "link.jpg").exists()
    assert not list(tmp_path.glob(".flower_photos.fetch-*"))  # the staging folder is gone

    # already in place: nothing happens, even with a source that does not exist
    stamp = tree_fingerprint(dest)
    fetch(str(tmp_path / "missing"), dest, progress=False)
    assert tree_fingerprint(dest) == stamp


def test_fetch_unpacks_a_tgz(tmp_path: Path) -> None:
    src = make_dataset(tmp_path / "flower_photos", per_class=1)
    archive = _tgz(tmp_path / "flowers.tgz", src, "flower_photos")
    dest = tmp_path / "out" / "data"
    fetch(str(archive), dest, progress=False)
    assert has_dataset(dest)
    def content(root: Path) -> dict[str, str]:  # tar keeps mtimes to the second only, so compare sha256s
        return {k: v[0] for k, v in tree_fingerprint(root).items()}

    assert content(dest) == content(src)


def _evil_tgz(path: Path, member: str, kind: str) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        info = tarfile.TarInfo("flower_photos/daisy/ok.jpg")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"abc"))
        info = tarfile.TarInfo(member)
        if kind == "file":
            info.size = 4
            tar.addfile(info, io.BytesIO(b"evil"))
        else:
            info.type = tarfile.SYMTYPE
            info.linkname = "/etc/passwd"
            tar.addfile(info)
    return path


@pytest.mark.parametrize(("member", "kind"), [("../escaped.jpg", "file"), ("ABS/escaped.jpg", "file"),
                                               ("flower_photos/daisy/link.jpg", "link")])
def test_fetch_refuses_members_escaping_the_destination(tmp_path: Path, member: str, kind: str) -> None:
    member = member.replace("ABS", str(tmp_path))  # an absolute path
    archive = _evil_tgz(tmp_path / "evil.tgz", member, kind)
    dest = tmp_path / "work" / "flower_photos"
    with pytest.raises(CurateError, match="unsafe member"):
        fetch(str(archive), dest, progress=False)
    assert not (tmp_path / "work" / "escaped.jpg").exists() and not (tmp_path / "escaped.jpg").exists()
    assert not has_dataset(dest)
    assert not list((tmp_path / "work").glob(".flower_photos.fetch-*"))


def test_fetch_offline_is_one_line_exit_2(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    # port 9 (discard) on localhost refuses the connection at once: the same path as being offline
    monkeypatch.setattr(curate.fetch, "FLOWERS_URL", "http://127.0.0.1:9/flower_photos.tgz")
    assert cli.main(["fetch", "--dest", str(tmp_path / "fp"), "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("curate fetch: error: cannot download") and "--from" in err and "\n" not in err
    assert not has_dataset(tmp_path / "fp")


def test_fetch_rejects_bad_sources(tmp_path: Path) -> None:
    with pytest.raises(CurateError, match="no such file"):
        fetch(str(tmp_path / "nope"), tmp_path / "d", progress=False)
    (tmp_path / "file.zip").write_bytes(b"PK")
    with pytest.raises(CurateError, match="expected a folder"):
        fetch(str(tmp_path / "file.zip"), tmp_path / "d", progress=False)
    (tmp_path / "bad.tgz").write_bytes(b"not gzip")
    with pytest.raises(CurateError, match="not a readable"):
        fetch(str(tmp_path / "bad.tgz"), tmp_path / "d", progress=False)
    src = make_dataset(tmp_path / "src", per_class=1)
    with pytest.raises(CurateError, match="overlap"):
        fetch(str(src), src / "inner", progress=False)
    (tmp_path / "noimages" / "a").mkdir(parents=True)
    with pytest.raises(CurateError, match="no class folders"):
        fetch(str(tmp_path / "noimages"), tmp_path / "d2", progress=False)
