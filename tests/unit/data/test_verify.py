"""data.verify (full | header | off), the scan cache, and the compact listing every rank holds."""

import os
import pickle
import shutil
import subprocess

import numpy as np
import pytest
import torch

from conftest import make_folder, write_image
from disttrain.data.folder import scan_image_folder
from disttrain.data.loader import FolderCollate, FolderDataset
from disttrain.data.paths import PathTable
from disttrain.data.verify import CACHE_NAME, ScanCache, check_header


def _bad_files(root):
    """An empty file, text named .png, and a PNG cut after its header (found by `full` only)."""
    (root / "train" / "a" / "empty.png").write_bytes(b"")
    (root / "train" / "a" / "page.png").write_text("<html>not found</html>")
    whole = (root / "train" / "b" / "000.png").read_bytes()
    (root / "train" / "b" / "cut.png").write_bytes(whole[:60])
    return {"empty.png", "page.png"}, {"cut.png"}


@pytest.fixture
def folder(tmp_path):
    return make_folder(tmp_path / "data", {"train": {"a": 5, "b": 4}, "valid": {"a": 2, "b": 2}})


def _names(bad):
    return sorted(os.path.basename(b.path) for b in bad)


def test_each_level_finds_what_it_says(folder):
    header_bad, decode_bad = _bad_files(folder)
    full = scan_image_folder(folder, verify="full", use_cache=False)
    header = scan_image_folder(folder, verify="header", use_cache=False)
    off = scan_image_folder(folder, verify="off", use_cache=False)
    assert _names(full.bad) == sorted(header_bad | decode_bad)
    assert _names(header.bad) == sorted(header_bad)
    assert off.bad == [] and len(off.train) == 12
    assert len(header.train) == 10 and "cut.png" in {os.path.basename(p) for p in header.train.paths}
    assert {b.reason for b in header.bad} == {"empty file (0 bytes)", "not an image: starts with b'<html>no'"}


@pytest.mark.parametrize("fmt,suffix", [("PNG", "png"), ("JPEG", "jpg"), ("GIF", "gif"), ("BMP", "bmp"), ("WEBP", "webp"),
                                        ("TIFF", "tif"), ("PPM", "ppm")])
def test_a_header_check_passes_every_format_the_decoder_reads(tmp_path, fmt, suffix):
    path = write_image(tmp_path / f"x.{suffix}", fmt=fmt)
    assert check_header(str(path)) is None
    assert check_header(str(write_image(tmp_path / "gray.png", mode="L"))) is None


def test_a_png_with_a_zero_size_fails_the_header_check(tmp_path):
    data = bytearray(write_image(tmp_path / "x.png").read_bytes())
    data[16:20] = b"\0\0\0\0"  # IHDR width
    (tmp_path / "zero.png").write_bytes(bytes(data))
    assert check_header(str(tmp_path / "zero.png")) == "PNG of size 0x20"


def test_the_cache_checks_again_only_what_changed(folder):
    header_bad, decode_bad = _bad_files(folder)
    first = scan_image_folder(folder, verify="full")
    cache = ScanCache.read(folder / "train" / CACHE_NAME)
    assert cache is not None and len(cache.names) == 12 and set(cache.level.tolist()) == {2}
    assert sorted(os.path.basename(cache.names[i]) for i in cache.reasons) == sorted(header_bad | decode_bad)

    written = (folder / "train" / CACHE_NAME).stat().st_mtime_ns
    scan_image_folder(folder, verify="full")
    assert (folder / "train" / CACHE_NAME).stat().st_mtime_ns == written  # nothing changed: not written again

    # a file made unreadable with its size and mtime kept is not opened again: its verdict stands
    kept = folder / "train" / "a" / "001.png"
    stat = kept.stat()
    kept.write_bytes(b"\0" * stat.st_size)
    os.utime(kept, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    # a changed file (new size) and a new file are checked again
    (folder / "train" / "a" / "002.png").write_bytes(b"garbage")
    write_image(folder / "train" / "b" / "new.png", size=(20, 20))
    # a file found bad that is replaced by a good one is taken again
    shutil.copy(folder / "train" / "b" / "000.png", folder / "train" / "b" / "cut.png")
    second = scan_image_folder(folder, verify="full")
    assert _names(second.bad) == sorted(header_bad | {"002.png"})
    assert str(kept) in set(second.train.paths)
    assert len(second.train) == len(first.train) + 1  # +new +cut -002
    # a cache written by `full` serves `header`: nothing is opened, the known bad files stay out
    assert _names(scan_image_folder(folder, verify="header").bad) == sorted(header_bad | {"002.png"})


def test_a_header_cache_does_not_pass_a_full_scan(folder):
    _, decode_bad = _bad_files(folder)
    scan_image_folder(folder, verify="header")
    assert decode_bad <= set(_names(scan_image_folder(folder, verify="full").bad))


def test_a_folder_that_cannot_be_written_keeps_its_cache_in_the_run_dir(folder, tmp_path):
    run = tmp_path / "run"
    if subprocess.run(["chattr", "+i", str(folder / "train")], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not available here (an immutable folder is the one root cannot write)")
    try:
        scan_image_folder(folder, verify="header", cache_dir=run)
        assert not (folder / "train" / CACHE_NAME).exists()
        assert len(list((run / "scan-cache").glob("*.npz"))) == 1
    finally:
        subprocess.run(["chattr", "-i", str(folder / "train")], check=True)


def test_a_cut_cache_file_is_rebuilt(folder):
    scan_image_folder(folder, verify="header")
    path = folder / "train" / CACHE_NAME
    path.write_bytes(path.read_bytes()[:100])
    assert len(scan_image_folder(folder, verify="header").train) == 9
    assert ScanCache.read(path) is not None


def test_the_listing_is_held_compactly(tmp_path):
    """What the main process broadcasts and every rank keeps: tens of bytes per file."""
    root = tmp_path / "many"
    png = (write_image(tmp_path / "one.png", size=(8, 8))).read_bytes()
    for split, count in (("train", 4000), ("valid", 400)):
        for i in range(count):
            path = root / split / f"class_{i % 40:03d}" / f"image_{i:07d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(png)
    data = scan_image_folder(root, verify="off")
    per_file = len(pickle.dumps(data)) / 4400
    # the relative name (27 bytes), its 8-byte offset and 8-byte label, and a little for the rest (a list of str: 100+)
    assert isinstance(data.train.paths, PathTable) and per_file < 27 + 8 + 8 + 4
    assert data.train.paths[4] == str(root / "train" / "class_000" / "image_0000160.png")
    assert data.train.labels[4] == 0 and data.train.labels[-1] == 39


def test_a_file_that_stops_decoding_is_counted_and_its_place_taken(folder):
    data = scan_image_folder(folder, verify="full")
    (folder / "train" / "a" / "001.png").write_bytes(b"")  # broken after the scan
    dataset = FolderDataset(data.train, 20)
    items = [dataset[i] for i in range(4)]
    assert items[1] is None
    images, labels, info = FolderCollate(substitute=True)(items)
    assert info == {"skipped": 1} and images.shape[0] == 4 and torch.equal(images[3], images[0])
    images, labels, info = FolderCollate(substitute=False)(items)
    assert info == {"skipped": 1} and images.shape[0] == 3 and labels.tolist() == [0, 0, 0]
    with pytest.raises(Exception, match="none of the 1 files of a training batch decodes"):
        FolderCollate(substitute=True)([None])


def test_path_table_round_trips_any_name(tmp_path):
    names = ["a/b.png", "é/ü.jpg", "x/\udcff.png", "deep/er/c.png"]
    table = PathTable.from_names(tmp_path, names)
    assert list(table.names()) == names and table[-1] == str(tmp_path / "deep/er/c.png")
    assert list(table.take(np.array([0, 3])).names()) == ["a/b.png", "deep/er/c.png"]
    assert list(table.take(np.array([False, True, False, True])).names()) == ["é/ü.jpg", "deep/er/c.png"]
    with pytest.raises(ValueError, match="keeps the table's order"):
        table.take(np.array([3, 0]))
    assert pickle.loads(pickle.dumps(table)) == table
    assert list(PathTable.concat(table, table[1:2]).names()) == names + ["é/ü.jpg"]
