"""`disttrain demo-data --layout folder|csv|names` and `--multi-label`: the same MNIST images in each
layout, the multi-label truth checked against the pixels, the same bytes on every call."""

import json
import re
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from disttrain.cli import main
from disttrain.data.demo import CELL, DIGIT_NAMES, GLYPH, MARKER, load_mnist_sample, write_demo_data
from disttrain.data.folder import DataError

SIZES = {"train_per_class": 3, "valid_per_class": 2}
NAME_RE = re.compile(r"^([a-z]+)_\d+\.png$")


def _pixels(file):
    return np.asarray(Image.open(file)).tobytes()


def _rows(csv_file):
    lines = csv_file.read_text().splitlines()
    return lines[0], [line.split(",") for line in lines[1:]]


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    return {
        "folder": write_demo_data(root / "folder", **SIZES),
        "csv": write_demo_data(root / "csv", **SIZES, layout="csv"),
        "names": write_demo_data(root / "names", **SIZES, layout="names"),
        "multi": write_demo_data(root / "multi", multi_label=True, count=50),
    }


@pytest.fixture(scope="module")
def folder_truth(samples):
    """The folder layout's images (their pixels) and digit labels."""
    return {_pixels(f): int(f.parent.name) for f in samples["folder"].glob("*/*/*.png")}


def test_folder_layout_and_its_marker_are_as_before(samples):
    path = samples["folder"]
    assert sorted(p.name for p in path.iterdir()) == [MARKER, "train", "valid"]
    assert (path / MARKER).read_text() == '{"train_per_class": 3, "valid_per_class": 2}', "a sample written before stays found"
    assert len(list(path.glob("train/*/*.png"))) == 30 and len(list(path.glob("valid/*/*.png"))) == 20


def test_csv_layout_holds_the_folder_sample_with_opaque_ids(samples, folder_truth):
    path = samples["csv"]
    header, rows = _rows(path / "labels.csv")
    assert header == "id,label"
    ids = [image_id for image_id, _ in rows]
    assert len(set(ids)) == len(ids) == 50 and ids == sorted(ids)
    assert all("." not in image_id and image_id.startswith("d") for image_id in ids), "ids carry no suffix (data.suffix: .png)"
    assert sorted(f.name for f in (path / "train").iterdir()) == [f"{i}.png" for i in ids]
    labels = [int(label) for _, label in rows]
    assert labels != sorted(labels), "the id order must not be the label order"
    assert Counter(labels) == Counter(folder_truth.values())
    written = {_pixels(path / "train" / f"{i}.png"): label for i, label in zip(ids, labels)}
    assert written == folder_truth, "the same images as the folder layout's train + valid, each with its digit"


def test_names_layout_puts_the_label_in_the_file_name(samples, folder_truth):
    files = sorted((samples["names"] / "train").iterdir())
    assert len(files) == 50 and not (samples["names"] / "labels.csv").exists()
    matches = [NAME_RE.match(f.name) for f in files]
    assert all(matches), [f.name for f, m in zip(files, matches) if not m]
    written = {_pixels(f): DIGIT_NAMES.index(m.group(1)) for f, m in zip(files, matches)}
    assert written == folder_truth


def test_multi_label_tags_are_exactly_the_digits_drawn(samples):
    path = samples["multi"]
    images, labels = load_mnist_sample()
    header, rows = _rows(path / "labels.csv")
    assert header == "id,tags" and len(rows) == 50
    assert [i for i, _ in rows] == [f"d{n:04d}" for n in range(1, 51)]
    p_header, p_rows = _rows(path / "placements.csv")
    assert p_header == "id,digit,row,top,left"
    placed: dict[str, list] = {}
    for image_id, *numbers in p_rows:
        placed.setdefault(image_id, []).append(tuple(int(n) for n in numbers))
    uses = Counter(row for glyphs in placed.values() for _, row, _, _ in glyphs)
    assert max(uses.values()) <= 2
    sizes = set()
    for image_id, tags in rows:
        digits = [int(t) for t in tags.split(" ")]
        glyphs = placed[image_id]
        assert digits == sorted({d for d, *_ in glyphs}) and len(digits) == len(glyphs), (image_id, tags, glyphs)
        assert 2 <= len(digits) <= 4
        sizes.add(len(digits))
        canvas = np.asarray(Image.open(path / "train" / f"{image_id}.png"))
        assert canvas.shape == (64, 64) and canvas.dtype == np.uint8
        drawn = np.zeros_like(canvas, dtype=bool)
        cells = set()
        for digit, row, top, left in glyphs:
            cell = (top // CELL, left // CELL)
            assert cell not in cells and (top + GLYPH - 1) // CELL == cell[0] and (left + GLYPH - 1) // CELL == cell[1]
            cells.add(cell)
            assert labels[row] == digit
            assert np.array_equal(canvas[top : top + GLYPH, left : left + GLYPH], images[row])
            drawn[top : top + GLYPH, left : left + GLYPH] = True
        assert not canvas[~drawn].any(), f"{image_id}: pixels outside its glyphs"
        for r in range(2):
            for c in range(2):
                if (r, c) not in cells:
                    assert not canvas[r * CELL : (r + 1) * CELL, c * CELL : (c + 1) * CELL].any()
    assert sizes == {2, 3, 4}


@pytest.mark.parametrize("options", [dict(layout="csv", **SIZES), dict(layout="names", **SIZES),
                                     dict(multi_label=True, count=50)], ids=["csv", "names", "multi-label"])
def test_the_same_bytes_on_every_call(tmp_path, samples, options):
    again = write_demo_data(tmp_path / "again", **options)
    first = samples["multi" if options.get("multi_label") else options["layout"]]
    names = sorted(f.name for f in (first / "train").iterdir())
    assert sorted(f.name for f in (again / "train").iterdir()) == names
    for name in names[:: max(1, len(names) // 5)]:
        assert (again / "train" / name).read_bytes() == (first / "train" / name).read_bytes()
    for table in ("labels.csv", "placements.csv", MARKER):
        if (first / table).exists():
            assert (again / table).read_bytes() == (first / table).read_bytes()


def test_a_second_call_is_a_no_op_and_other_options_are_refused(tmp_path):
    path = write_demo_data(tmp_path / "m", multi_label=True, count=5)
    assert json.loads((path / MARKER).read_text()) == {"layout": "csv", "multi_label": True, "count": 5}
    first = (path / "train" / "d0003.png").stat().st_mtime_ns
    assert write_demo_data(tmp_path / "m", layout="csv", multi_label=True, count=5) == path
    assert (path / "train" / "d0003.png").stat().st_mtime_ns == first
    for other in (dict(multi_label=True, count=6), dict(layout="csv", **SIZES), dict(layout="names", **SIZES), {}):
        with pytest.raises(FileExistsError, match="not a finished MNIST sample"):
            write_demo_data(tmp_path / "m", **other)
    assert not (tmp_path / "m.partial").exists()


@pytest.mark.parametrize("options, message", [
    (dict(layout="names", multi_label=True), "--multi-label writes the csv layout"),
    (dict(layout="folder", multi_label=True), "--multi-label writes the csv layout"),
    (dict(multi_label=True, train_per_class=3), "the multi-label sample's size is --count"),
    (dict(layout="csv", count=50), "add --multi-label or drop --count"),
    (dict(multi_label=True, count=0), "--count 0: must be within"),
    (dict(layout="tsv"), "--layout tsv: not a layout"),
])
def test_options_that_do_not_go_together_are_refused_before_writing(tmp_path, options, message):
    with pytest.raises(DataError, match=re.escape(message)):
        write_demo_data(tmp_path / "m", **options)
    assert not (tmp_path / "m").exists() and not (tmp_path / "m.partial").exists()


def test_the_command_refuses_names_with_multi_label_in_one_line(tmp_path, capsys):
    assert main(["demo-data", str(tmp_path / "m"), "--layout", "names", "--multi-label"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("disttrain: error: --multi-label writes the csv layout"), err
    assert not (tmp_path / "m").exists()


def test_the_command_writes_a_layout(tmp_path, capsys):
    assert main(["demo-data", str(tmp_path / "m"), "--layout", "names", "--train-per-class", "1", "--valid-per-class", "1"]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "m")
    assert len(list((tmp_path / "m" / "train").glob("*_*.png"))) == 20
