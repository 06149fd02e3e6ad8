"""`disttrain inspect`: the figures of small synthetic sources whose truth is known (counts, tags per
image, size quantiles from headers, bad files), the split equal to what training's listing draws, the
load_size rule, the JSON and the figures; and the command itself through the CLI's main()."""

import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from disttrain.cli import main
from disttrain.config import DataConfig
from disttrain.data.demo import write_demo_data
from disttrain.data.inspect import (LOAD_CAP, SAMPLE_SEED, describe, inspect_data, plot_inspection, read_header, sample_indices,
                                    suggest_load_size)
from disttrain.data.source import list_source

DEMO_CONFIG = Path(__file__).resolve().parents[3] / "configs" / "demo.yaml"
ORIENTATION = 0x0112
# name, class, (width, height) as stored, format, EXIF orientation
CSV_IMAGES = [
    ("c1", "cat", (320, 240), "JPEG", 1),
    ("c2", "cat", (400, 300), "JPEG", 1),
    ("c3", "cat", (500, 375), "PNG", 1),
    ("c4", "cat", (300, 400), "JPEG", 1),
    ("c5", "cat", (640, 480), "JPEG", 1),
    ("c6", "cat", (800, 600), "PNG", 1),
    ("d1", "dog", (256, 256), "JPEG", 1),
    ("d2", "dog", (1024, 768), "JPEG", 1),
    ("d3", "dog", (360, 480), "PNG", 1),
    ("d4", "dog", (600, 450), "JPEG", 6),  # a phone photo stored sideways: training sees 450 x 600
    ("r1", "rare", (330, 330), "PNG", 1),
    ("r2", "rare", (200, 150), "JPEG", 1),
]
SEEN = {name: ((h, w) if o == 6 else (w, h)) for name, _, (w, h), _, o in CSV_IMAGES}


def _write(path: Path, size: tuple[int, int], fmt: str = "PNG", orientation: int = 1) -> None:
    img = Image.new("RGB", size, (90, 120, 150))
    if orientation != 1:
        exif = Image.Exif()
        exif[ORIENTATION] = orientation
        img.save(path, fmt, exif=exif)
    else:
        img.save(path, fmt)


def _truncated_jpeg(path: Path) -> None:
    """A JPEG cut before its frame header: PIL cannot read its size."""
    data = io.BytesIO()
    Image.new("RGB", (64, 48)).save(data, "JPEG")
    path.write_bytes(data.getvalue()[:40])


def _by_hand(values: list[int], q: float) -> int:
    """The smallest value that at least a fraction q of the values reach at or below."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


@pytest.fixture
def csv_source(tmp_path):
    """A dog-breeds-like source: ids without a suffix, a rare class, a truncated file, a row whose
    file is missing, and an image no row names."""
    folder = tmp_path / "train"
    folder.mkdir()
    for name, label, size, fmt, orientation in CSV_IMAGES:
        _write(folder / f"{name}.{'jpg' if fmt == 'JPEG' else 'png'}", size, fmt, orientation)
    rows = ["file,breed"] + [f"{name}.{'jpg' if fmt == 'JPEG' else 'png'},{label}" for name, label, _, fmt, _ in CSV_IMAGES]
    _truncated_jpeg(folder / "d5.jpg")
    rows += ["d5.jpg,dog", "ghost.jpg,cat"]
    _write(folder / "stray.png", (50, 50))
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    return tmp_path


def _csv_config(root: Path, **more) -> DataConfig:
    return DataConfig(root=str(root), labels="labels.csv", valid_pct=0.25, stratify=True, **more)


def test_counts_sizes_bad_files_and_split_of_a_csv_source(csv_source):
    data = _csv_config(csv_source)
    found = inspect_data(data, sample=0)
    assert found.source == f"labels table {csv_source / 'labels.csv'}"
    assert not found.multi_label and found.classes == ["cat", "dog", "rare"]
    assert found.images == 13  # 12 good + the truncated one (listed; its header fails); the missing row is not an image
    assert found.counts == {"cat": 6, "dog": 5, "rare": 2}
    assert found.rarest == ("rare", 2) and found.most_common == ("cat", 6)
    assert found.unlabelled == 1  # stray.png
    assert found.tags is None

    sizes = list(SEEN.values())
    assert found.sizes.read == found.sizes.of == 13 and not found.sizes.sampled
    for q, name in [(0.0, "min"), (0.05, "5%"), (0.25, "25%"), (0.5, "50%"), (0.75, "75%"), (0.95, "95%"), (1.0, "max")]:
        assert found.sizes.width[name] == _by_hand([w for w, _ in sizes], q)
        assert found.sizes.height[name] == _by_hand([h for _, h in sizes], q)
        assert found.sizes.shorter[name] == _by_hand([min(s) for s in sizes], q)
    assert found.sizes.shorter["50%"] == 330 and found.sizes.width["max"] == 1024
    assert sorted(found.sizes.shorter_sides) == sorted(min(s) for s in sizes)

    bad = {Path(b.path).name: b.reason for b in found.bad}
    assert set(bad) == {"ghost.jpg", "d5.jpg"} and found.unreadable == 1
    assert bad["d5.jpg"].startswith("header unreadable") and "labels.csv" in bad["ghost.jpg"]

    listing = list_source(data)  # what training draws
    assert (found.split.train, found.split.valid) == (len(listing.train), len(listing.valid))
    assert found.split.train + found.split.valid == 13 and found.split.valid >= 3  # a valid image of each class
    assert found.split.how == "valid_pct=0.25 seed=42 stratified"
    valid_names = [listing.classes[t] for _, t in listing.valid]
    assert found.split.valid_per_class == {c: valid_names.count(c) for c in listing.classes}
    assert found.split.valid_per_class["rare"] == 1 and found.split.no_train == []

    assert found.load_size.suggested == 320  # 330 rounded down to a multiple of 32, within [224, 512]
    assert found.load_size.current == 256 and found.load_size.image_size == 224


def test_the_printed_lines_say_the_figures(csv_source):
    lines = describe(inspect_data(_csv_config(csv_source), sample=0))
    listing = list_source(_csv_config(csv_source))
    text = "\n".join(lines)
    assert "images: 13 in 3 classes" in lines
    assert "  rare        2" in lines and "  cat         6" in lines
    assert "rarest: rare (2 images); most common: cat (6 images)" in lines
    assert "headers of all 13 files" in text
    shorter = next(line for line in lines if line.startswith("  shorter")).split()
    assert shorter == ["shorter", "150", "150", "256", "330", "450", "768", "768"]
    assert f"{csv_source / 'train' / 'd5.jpg'}: header unreadable" in text and "ghost.jpg" in text
    assert "training's scan decodes every file" in text
    assert f"split: {len(listing.train)} train / {len(listing.valid)} valid images (valid_pct=0.25 seed=42 stratified)" in lines
    assert "suggested data.load_size: 320 (now 256; data.image_size 224)" in lines
    assert "unlabelled: 1 image(s)" in text


def test_a_random_split_that_leaves_a_class_without_training_images_is_warned(tmp_path):
    folder = tmp_path / "train"
    folder.mkdir()
    rows = []
    for i in range(8):
        _write(folder / f"x{i}.png", (40, 40))
        rows.append(f"x{i}.png,{'common' if i else 'single'}")
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    for seed in range(50):  # a seed whose draw puts the single image in validation
        data = DataConfig(root=str(tmp_path), labels="labels.csv", valid_pct=0.5, split_seed=seed, image_size=32, load_size=32)
        listing = list_source(data)
        if any(t == listing.classes.index("single") for _, t in listing.valid):
            break
    found = inspect_data(data)
    assert found.split.no_train == ["single"]
    assert any("class(es) single have no training image" in line and "data.stratify=true" in line for line in describe(found))


def test_tags_per_image_of_a_multi_label_table(tmp_path):
    folder = tmp_path / "train"
    folder.mkdir()
    tags = ["a b", "a", "", "a b c", "b c", "c", "a b c d e f g", "b"]
    for i in range(len(tags)):
        _write(folder / f"m{i}.png", (64 + 32 * i, 64))
    (tmp_path / "labels.csv").write_text("id,tags\n" + "".join(f"m{i},{t}\n" for i, t in enumerate(tags)))
    data = DataConfig(root=str(tmp_path), labels="labels.csv", suffix=".png", label_delim=" ", valid_pct=0.25, image_size=32, load_size=32)
    found = inspect_data(data)
    assert found.multi_label and found.classes == list("abcdefg")
    assert found.counts == {"a": 4, "b": 5, "c": 4, "d": 1, "e": 1, "f": 1, "g": 1}
    assert found.rarest == ("d", 1) and found.most_common == ("b", 5)
    t = found.tags
    assert (t.min, t.median, t.max, t.untagged) == (0, 1.5, 7, 1)
    assert t.distribution == {"0": 1, "1": 3, "2": 2, "3": 1, "4": 0, "5": 0, "6+": 1}
    listing = list_source(data)
    assert (found.split.train, found.split.valid) == (len(listing.train), len(listing.valid)) == (6, 2)
    assert found.split.valid_per_class is None
    assert found.sizes.shorter["50%"] == 64 and found.load_size.suggested == 64
    text = "\n".join(describe(found))
    assert "images: 8 in 7 tags" in text
    assert "tags per image: min 0, median 1.5, max 7 (images per tag count: 0: 1, 1: 3, 2: 2, 3: 1, 4: 0, 5: 0, 6+: 1); " \
           "images without any tag: 1" in text


def test_a_seeded_sample_reads_at_most_n_headers(tmp_path):
    root = tmp_path / "data"
    for c in ("a", "b"):
        for i in range(15):
            (root / "train" / c).mkdir(parents=True, exist_ok=True)
            _write(root / "train" / c / f"{i:02d}.png", (20 + i, 30))
        (root / "valid" / c).mkdir(parents=True)
        _write(root / "valid" / c / "v.png", (99, 99))
    data = DataConfig(root=str(root), image_size=16, load_size=16)
    found = inspect_data(data, sample=7)
    assert (found.sizes.read, found.sizes.of, found.sizes.sampled) == (7, 32, True)
    listing = list_source(data)
    paths = [p for p, _ in listing.train + listing.valid]
    chosen = [paths[i] for i in sample_indices(32, 7)]
    assert sorted(found.sizes.shorter_sides) == sorted(min(read_header(p)) for p in chosen)
    assert found.sizes == inspect_data(data, sample=7).sizes  # seeded: the same files every time
    assert list(sample_indices(32, 7)) == sorted(np.random.default_rng(SAMPLE_SEED).choice(32, 7, replace=False))
    assert inspect_data(data, sample=0).sizes.read == 32 == inspect_data(data, sample=32).sizes.read
    assert found.split.how == f"the folder {root / 'valid'}" and (found.split.train, found.split.valid) == (30, 2)
    assert any("seeded sample of 7 of the 32 files" in line for line in describe(found))


@pytest.mark.parametrize("median, image_size, expected", [
    (300, 224, 288),     # rounded down to a multiple of 32
    (256, 224, 256),     # already one
    (28, 28, 28),        # below 32: the median itself (MNIST)
    (64, 28, 64),
    (100, 224, 224),     # never below data.image_size
    (1000, 224, LOAD_CAP),
    (1000, 600, 600),    # an input above the cap wins
])
def test_the_load_size_rule(median, image_size, expected):
    found = suggest_load_size(median, image_size, 256)
    assert found.suggested == expected
    assert "rounded down to a multiple of 32" in found.rule and found.why


def test_the_load_size_why_says_when_most_images_are_upsampled():
    assert "at least half the images are upsampled" in suggest_load_size(100, 224, 256).why
    assert "capped at 512" in suggest_load_size(1000, 224, 256).why
    assert suggest_load_size(None, 224, 256).suggested == 256


def test_more_than_30_classes_show_the_10_rarest_and_10_most_common(tmp_path):
    root = tmp_path / "many"
    for i in range(35):
        for j in range(1 + i // 5):
            (root / "train" / f"k{i:02d}").mkdir(parents=True, exist_ok=True)
            _write(root / "train" / f"k{i:02d}" / f"{j}.png", (8, 8))
    (root / "valid").mkdir()
    lines = describe(inspect_data(DataConfig(root=str(root), image_size=8, load_size=8)))
    start = lines.index("images per class: the 10 rarest of 35")
    assert [line.split()[0] for line in lines[start + 1:start + 11]] == [f"k{i:02d}" for i in range(10)]
    assert lines[start + 11] == "  and the 10 most common"
    assert [line.split()[0] for line in lines[start + 12:start + 22]] == [f"k{i:02d}" for i in [30, 31, 32, 33, 34, 25, 26, 27, 28, 29]]
    assert "rarest: k00 (1 images); most common: k30 (7 images)" in lines


def test_the_figures_are_images(csv_source, tmp_path):
    written = plot_inspection(inspect_data(_csv_config(csv_source), sample=0), tmp_path / "look")
    assert [p.name for p in written] == ["shorter_sides.png", "class_counts.png"]
    for path in written:
        with Image.open(path) as img:
            img.verify()
            assert img.format == "PNG"
        with Image.open(path) as img:
            assert img.size[0] > 100 and np.asarray(img.convert("L")).std() > 0  # something is drawn


def test_the_command_prints_writes_json_and_figures(csv_source, tmp_path, capsys):
    out, report = tmp_path / "look", tmp_path / "inspect.json"
    # an override before DATA, --labels after it; the figures and the JSON
    code = main(["inspect", "data.valid_pct=0.25", str(csv_source), "--labels", "labels.csv", "data.stratify=true", "--sample", "0",
                 "--json", str(report), "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "images: 13 in 3 classes" in printed and "suggested data.load_size: 320" in printed
    assert f"wrote {report}" in printed and "shorter_sides.png" in printed
    figures = json.loads(report.read_text())
    listing = list_source(_csv_config(csv_source))
    assert figures["counts"] == {"cat": 6, "dog": 5, "rare": 2}
    assert figures["split"]["train"] == len(listing.train) and figures["split"]["valid"] == len(listing.valid)
    assert figures["sizes"]["shorter"]["50%"] == 330 and "shorter_sides" not in figures["sizes"]
    assert figures["load_size"]["suggested"] == 320
    assert {Path(b["path"]).name for b in figures["bad"]} == {"ghost.jpg", "d5.jpg"}
    for name in ("shorter_sides.png", "class_counts.png"):
        with Image.open(out / name) as img:
            img.verify()


def test_the_command_on_the_names_layout_lists_an_unmatched_file(tmp_path, capsys):
    root = write_demo_data(tmp_path / "names", 3, 2, layout="names")
    _write(Path(root) / "train" / "README.png", (28, 28))
    code = main(["inspect", str(root), "data.label_regex=^([a-z]+)_\\d+\\.png$", "data.valid_pct=0.2", "--config", str(DEMO_CONFIG)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "images: 50 in 10 classes" in printed and "every class has 5 images" in printed
    assert "README.png: data.label_regex" in printed
    assert "suggested data.load_size: 28 (now 28; data.image_size 28)" in printed


@pytest.mark.parametrize("argv, says", [
    (["--labels", "labels.csv"], "set data.valid_pct=0.2"),                      # a flat folder without a split: training's line
    (["--labels", "nope.csv", "data.valid_pct=0.2"], "nope.csv does not exist"),
    (["data.valid_pct=0.2", "--sample", "-1", "--labels", "labels.csv"], "--sample: must be 0"),
    (["--labels", "labels.csv", "data.valid_pct=2"], "data.valid_pct: must be in [0, 1)"),
    (["data.format=shards"], "data.format=shards"),
    (["data.nokey=1"], "data.nokey"),
])
def test_user_errors_are_one_line_and_exit_2(csv_source, capsys, argv, says):
    assert main(["inspect", str(csv_source), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("disttrain: error: ") and says in err and "\n" not in err


def test_a_missing_root_is_one_line(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "absent")]) == 2
    assert "data.root:" in capsys.readouterr().err
    assert main(["inspect", "data.valid_pct=0.2"]) == 2
    assert "takes one DATA folder" in capsys.readouterr().err
    assert main(["inspect", str(tmp_path), str(tmp_path)]) == 2
    assert "takes one DATA folder" in capsys.readouterr().err
