"""Data sources without class folders (disttrain/data/labels.py, split.py, source.py): a CSV table of
labels (the dog breeds' ids without a suffix, planet's space-separated tags), labels from file names
(the pets'), the seeded validation split, and every way a table can be wrong: one line naming the
file and the row, before anything trains."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from disttrain.config.parse import build_config_unchecked
from disttrain.data.folder import DataError, scan_listing
from disttrain.data.labels import read_label_table
from disttrain.data.source import list_source
from disttrain.data.split import draw_split, rarest_tag_strata


def _images(folder: Path, names: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        Image.new("RGB", (12, 10), (i * 7 % 255, 40, 90)).save(folder / name)


def _data(root: Path, *overrides: str):
    return build_config_unchecked(None, [f"data.root={root}", *overrides]).data


@pytest.fixture
def breeds(tmp_path) -> Path:
    """Dog-breeds layout: train/<id>.jpg, labels.csv `id,breed` with ids without a suffix; one
    row names a missing file, one image has no row."""
    root = tmp_path / "breeds"
    ids = [f"{i:04x}" for i in range(40)]
    _images(root / "train", [f"{i}.jpg" for i in ids] + ["zz-unlisted.jpg"])
    rows = ["id,breed"] + [f"{i},{['boston_bull', 'dingo', 'pug'][n % 3]}" for n, i in enumerate(ids)] + ["ffff,pug"]
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    return root


def test_a_table_with_ids_without_suffix_lists_classes_a_seeded_split_and_the_missing_row(breeds):
    data = _data(breeds, "data.labels=labels.csv", "data.suffix=.jpg", "data.valid_pct=0.2")
    listing = list_source(data)
    assert listing.classes == ["boston_bull", "dingo", "pug"] and not listing.multi_label
    assert len(listing.split.valid) == 8 and listing.split.train == 33  # round(0.2 x 41 rows): drawn over the rows
    assert len(listing.train) + len(listing.valid) == 40  # the row naming a missing file is set aside, not trained on
    assert [p.name for p, _ in listing.valid] == [name for name in listing.split.valid if name != "ffff.jpg"]
    assert [b.path for b in listing.bad] == [str(breeds / "train" / "ffff.jpg")] and "labels.csv (line 42)" in listing.bad[0].reason
    again = list_source(data)
    assert again.split.digest == listing.split.digest and again.valid == listing.valid
    other = list_source(_data(breeds, "data.labels=labels.csv", "data.suffix=.jpg", "data.valid_pct=0.2", "data.split_seed=7"))
    assert other.split.digest != listing.split.digest
    scanned = scan_listing(listing)
    assert len(scanned.bad) == 1 and len(scanned.train) == len(listing.train)
    with pytest.raises(DataError, match="not decodable|ffff.jpg"):
        scan_listing(listing, bad_files="error")


def test_named_columns_a_valid_column_and_several_tags_per_row(tmp_path):
    root = tmp_path / "planet"
    _images(root / "imgs", [f"t{i}.png" for i in range(6)])
    (root / "tags.csv").write_text("is_valid,tags,image_name\n0,clear primary,t0\n0,haze,t1\n1,clear water primary,t2\n"
                                   "0,,t3\n1,haze primary,t4\n0,primary clear,t5\n")
    data = _data(root, "data.labels=tags.csv", "data.images=imgs", "data.suffix=.png", "data.fname_col=image_name",
                 "data.label_col=tags", "data.label_delim= ", "data.valid_col=is_valid")
    listing = list_source(data)
    assert listing.multi_label and listing.classes == ["clear", "haze", "primary", "water"]
    assert [(p.name, t) for p, t in listing.valid] == [("t2.png", (0, 2, 3)), ("t4.png", (1, 2))]
    assert dict((p.name, t) for p, t in listing.train)["t3.png"] == ()  # no tag at all: allowed for multi-label
    split = scan_listing(listing).train
    hot = split.targets()
    assert hot.dtype == np.uint8 and hot.shape == (4, 4) and hot[0].tolist() == [1, 0, 1, 0]
    assert listing.split.how == "valid_col=is_valid"


def test_a_tags_column_is_read_as_space_separated_tags_without_label_delim(tmp_path):
    root = tmp_path / "planet"
    _images(root / "train-jpg", ["train_0.jpg", "train_1.jpg", "train_2.jpg"])
    (root / "train_v2.csv").write_text("image_name,tags\ntrain_0,haze primary\ntrain_1,agriculture clear primary water\ntrain_2,clear\n")
    listing = list_source(_data(root, "data.labels=train_v2.csv", "data.images=train-jpg", "data.suffix=.jpg", "data.valid_pct=0"))
    assert listing.multi_label and listing.classes == ["agriculture", "clear", "haze", "primary", "water"]
    assert [t for _, t in listing.train] == [(2, 3), (0, 1, 3, 4), (1,)]


def test_labels_from_file_names_skip_or_refuse_a_name_the_regex_does_not_match(tmp_path):
    root = tmp_path / "pets"
    _images(root / "train", ["great_pyrenees_173.jpg", "great_pyrenees_2.jpg", "pug_11.jpg", "pug_12.jpg", "README.jpg"])
    data = _data(root, r"data.label_regex=^(.+)_\d+\.jpg$", "data.valid_pct=0.25", "data.stratify=true")
    listing = list_source(data)
    assert listing.classes == ["great_pyrenees", "pug"]
    assert [b.path for b in listing.bad] == [str(root / "train" / "README.jpg")]
    assert sorted(t for _, t in listing.valid) == [0, 1]  # stratified: each class has one in each part
    with pytest.raises(DataError, match="README.jpg"):
        scan_listing(listing, bad_files="error")


@pytest.mark.parametrize("table, message", [
    ("id,breed\na,pug\na,dingo\n", r"line 3\) names a.jpg, as the row at line 2 does|line 3 names a.jpg"),
    ("id,breed\na,pug\nb,\n", "line 3 has an empty label for b.jpg"),
    ("id;breed\na;pug\n", "column"),
    ("id,breed\na\n", "line 2 has 1 field"),
])
def test_a_wrong_table_stops_with_the_file_and_the_row(tmp_path, table, message):
    root = tmp_path / "bad"
    _images(root / "train", ["a.jpg", "b.jpg"])
    (root / "labels.csv").write_text(table)
    data = _data(root, "data.labels=labels.csv", "data.suffix=.jpg", "data.valid_pct=0.5")
    with pytest.raises(DataError, match=message) as err:
        list_source(data)
    assert str(root / "labels.csv") in str(err.value) and "\n" not in str(err.value)


def test_a_missing_column_name_a_binary_file_and_a_table_naming_no_file(tmp_path):
    root = tmp_path / "t"
    _images(root / "train", ["a.jpg", "b.jpg"])
    (root / "labels.csv").write_text("id,breed\na,pug\nb,dingo\n")
    with pytest.raises(DataError, match=r"no column 'label' for data.label_col \(its header: id, breed\)"):
        list_source(_data(root, "data.labels=labels.csv", "data.suffix=.jpg", "data.valid_pct=0.5", "data.label_col=label"))
    with pytest.raises(DataError, match=r"none of its \d+ file.* data.suffix"):
        list_source(_data(root, "data.labels=labels.csv", "data.valid_pct=0.5"))
    (root / "bin.csv").write_bytes(bytes(range(256)))
    with pytest.raises(DataError, match="is not a text CSV"):
        list_source(_data(root, "data.labels=bin.csv", "data.valid_pct=0.5"))
    with pytest.raises(DataError, match="no validation folder; set data.valid_pct=0.2"):
        list_source(_data(root, "data.labels=labels.csv", "data.suffix=.jpg"))


def test_the_header_row_is_detected_from_the_files_with_column_indices(tmp_path):
    folder = tmp_path / "train"
    _images(folder, ["x1.jpg", "x2.jpg"])
    (tmp_path / "with.csv").write_text("file,label\nx1.jpg,a\nx2.jpg,b\n")
    (tmp_path / "without.csv").write_text("x1.jpg,a\nx2.jpg,b\n")
    assert read_label_table(tmp_path / "with.csv", folder).files == ["x1.jpg", "x2.jpg"]
    assert read_label_table(tmp_path / "without.csv", folder).tags == [("a",), ("b",)]


def test_the_split_is_seeded_exact_in_size_and_stratified_keeps_a_rare_class_on_both_sides():
    mask = draw_split(1000, 0.2, seed=42)
    assert mask.sum() == 200 and np.array_equal(mask, draw_split(1000, 0.2, seed=42))
    assert not np.array_equal(mask, draw_split(1000, 0.2, seed=43))
    assert draw_split(10, 0.0, seed=1).sum() == 0
    labels = [0] * 98 + [1, 1]
    strat = draw_split(100, 0.2, seed=0, strata=rarest_tag_strata(labels, 2))
    assert strat[98:].tolist() in ([True, False], [False, True]) and strat[:98].sum() == 20  # round(0.2 x 98)
    tags = [(0, 1)] * 5 + [(0,)] * 5
    assert rarest_tag_strata(tags, 2) == [1] * 5 + [0] * 5


def test_valid_pct_on_class_folders_draws_from_train_and_zero_keeps_everything(tmp_path):
    root = tmp_path / "folders"
    for cls in ("a", "b"):
        _images(root / "train" / cls, [f"{cls}{i}.png" for i in range(10)])
    listing = list_source(_data(root, "data.valid_pct=0.3"))
    assert len(listing.valid) == 6 and len(listing.train) == 14 and all(name.startswith(("a/", "b/")) for name in listing.split.valid)
    everything = list_source(_data(root, "data.valid_pct=0"))
    assert len(everything.train) == 20 and everything.valid == [] and everything.split.valid == []


def test_the_ants_and_bees_photos_as_a_flat_folder_with_a_csv_and_with_names_give_the_folders_labels(hymenoptera, tmp_path):
    """The real photos as the dog breeds' layout (`<id>.jpg`, ids without a suffix in labels.csv, the
    val/ photos marked by a column) and as the pets' (`ants_0001.jpg`): the same photos with the same
    labels as the class folders, and the same validation photos."""
    from disttrain.data.folder import list_image_folder

    tree = list_image_folder(hymenoptera, "train", "val")
    flat, named = tmp_path / "flat" / "images", tmp_path / "named" / "train"
    flat.mkdir(parents=True)
    named.mkdir(parents=True)
    rows, truth = ["id,label,is_valid"], {}
    for part, files in (("0", tree.train), ("1", tree.valid)):
        for n, (path, label) in enumerate(files):
            ident = f"{part}{n:04d}"
            (flat / f"{ident}.jpg").symlink_to(path)  # the decoder reads the content (a .jpeg, the GIF) whatever the name
            (named / f"{tree.classes[label]}_{ident}.jpg").symlink_to(path)
            rows.append(f"{ident},{tree.classes[label]},{part}")
            truth[path.resolve()] = (label, part == "1")
    (tmp_path / "flat" / "labels.csv").write_text("\n".join(rows) + "\n")
    table = list_source(_data(tmp_path / "flat", "data.labels=labels.csv", "data.images=images", "data.suffix=.jpg",
                              "data.valid_col=is_valid"))
    names = list_source(_data(tmp_path / "named", r"data.label_regex=^([a-z]+)_\d+\.jpg$", "data.valid_pct=0.2", "data.stratify=true"))
    for listing in (table, names):
        assert listing.classes == tree.classes == ["ants", "bees"] and not listing.bad
        assert sorted((p.resolve(), t) for p, t in listing.train + listing.valid) == sorted((p, t) for p, (t, _) in truth.items())
    assert sorted(p.resolve() for p, _ in table.valid) == sorted(p for p, (_, valid) in truth.items() if valid)
    assert len(names.valid) == round(0.2 * sum(1 for t, _ in truth.values() if t == 0)) + round(0.2 * sum(1 for t, _ in truth.values() if t == 1))
    scanned = scan_listing(table)
    assert len(scanned.train) == len(tree.train) and len(scanned.valid) == len(tree.valid) and not scanned.bad
