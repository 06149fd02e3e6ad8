"""`disttrain prepare` from any source: a CSV-labelled flat folder (one label, or several per image),
its drawn split recorded in the manifest, each sample's labels read back from the tars equal to the
CSV's, multi-label shards read as uint8 multi-hot rows, and a class-folder tree sharded as before."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import shutil
import tarfile
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import make_folder
from disttrain.cli import main
from disttrain.config import DataConfig
from disttrain.data.demo import write_demo_data
from disttrain.data.folder import DataError, list_image_folder
from disttrain.data.prepare import PrepareSettings, prepare
from disttrain.data.shards import ShardDataset, load_manifest, read_range
from disttrain.data.source import list_source

SETTINGS = PrepareSettings(samples_per_shard=7, presize=16)


def _quiet(_: str) -> None:
    pass


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("sources")
    return {
        "csv": write_demo_data(root / "csv", train_per_class=5, valid_per_class=2, layout="csv"),
        "multi": write_demo_data(root / "multi", multi_label=True, count=60),
    }


def _csv_source(root: Path, multi: bool = False, **keys) -> DataConfig:
    return DataConfig(root=str(root), labels="labels.csv", suffix=".png", valid_pct=0.2,
                      label_delim=" " if multi else None, **keys)


def _csv_truth(root: Path) -> dict[str, set[str]]:
    """File name -> its labels, read from labels.csv with the csv module (header `id,label|tags`)."""
    rows = list(csv.reader((root / "labels.csv").read_text().splitlines()))[1:]
    return {f"{name}.png": set(labels.split()) for name, labels in rows}


def _samples(out: Path, split: str) -> list[dict[str, bytes]]:
    """Every sample of a split's shards (plain tarfile, manifest order): its members by extension."""
    manifest = json.loads((out / "manifest.json").read_text())
    samples: dict[str, dict[str, bytes]] = {}
    for shard in manifest["splits"][split]["shards"]:
        with tarfile.open(out / shard["name"]) as tar:
            for member in tar.getmembers():
                key, _, ext = member.name.partition(".")
                samples.setdefault(f"{shard['name']}/{key}", {})[ext] = tar.extractfile(member).read()
    return list(samples.values())


def test_csv_source_shards_hold_the_csv_labels_and_the_drawn_split(demo, tmp_path):
    src = tmp_path / "csv"
    shutil.copytree(demo["csv"], src)
    with open(src / "labels.csv", "a") as table:  # a row naming a file that is not there: listed, not sharded
        table.write("gone,3\n")
    data = _csv_source(src)
    listing = list_source(data)
    assert listing.split is not None and "train/gone.png" in {str(Path(b.path).relative_to(src)) for b in listing.bad}
    manifest = prepare(src, tmp_path / "out", SETTINGS, workers=2, progress=False, log=_quiet, source=data)

    assert manifest["classes"] == listing.classes == [str(d) for d in range(10)]
    assert "multi_label" not in manifest and manifest["split"] == asdict(listing.split)
    assert manifest["split"]["how"] == "valid_pct=0.2 seed=42"
    truth = _csv_truth(src)
    drawn_valid = set(listing.split.valid)
    for split, expected in (("train", set(truth) - drawn_valid - {"gone.png"}), ("valid", drawn_valid - {"gone.png"})):
        samples = _samples(tmp_path / "out", split)
        assert manifest["splits"][split]["samples"] == len(samples) == len(expected) == len(getattr(listing, split))
        assert all(set(s) == {"cls", "jpg", "path"} for s in samples)
        read = {s["path"].decode(): {manifest["classes"][int(s["cls"])]} for s in samples}
        assert set(read) == expected and all(read[name] == truth[name] for name in read)
    assert manifest["splits"]["train"]["samples"] + manifest["splits"]["valid"]["samples"] == listing.split.train + len(drawn_valid) - 1
    listed = [b["path"] for split in manifest["splits"].values() for b in split["bad_files"]]
    assert listed == [str(src / "train" / "gone.png")]

    # a single-label manifest still reads as int64 labels, unchanged
    shards = load_manifest(tmp_path / "out")
    assert shards.multi_label is False and shards.split == manifest["split"]
    images, labels, info = next(iter(ShardDataset(shards, "valid", 64, 16, train=False)))
    assert labels.dtype == np.int64 and labels.shape == (len(info["keys"]),)


def test_multi_label_shards_store_tags_and_read_as_multi_hot_rows(demo, tmp_path):
    src = demo["multi"]
    data = _csv_source(src, multi=True, stratify=True)
    listing = list_source(data)
    assert listing.multi_label
    out = tmp_path / "out"
    manifest = prepare(src, out, SETTINGS, workers=1, progress=False, log=_quiet, source=data)

    assert manifest["multi_label"] is True and manifest["classes"] == listing.classes
    assert manifest["split"] == asdict(listing.split) and manifest["split"]["how"].endswith("stratified")
    truth = _csv_truth(src)
    assert any(len(tags) > 1 for tags in truth.values())
    by_path: dict[str, tuple[int, ...]] = {}
    for split, expected in (("train", set(truth) - set(listing.split.valid)), ("valid", set(listing.split.valid))):
        samples = _samples(out, split)
        assert manifest["splits"][split]["samples"] == len(samples) == len(expected) == len(getattr(listing, split))
        assert all(set(s) == {"tags", "jpg", "path"} for s in samples)  # no .cls: a webdataset int decoder never misreads them
        for s in samples:
            indices = tuple(int(t) for t in s["tags"].split())
            assert list(indices) == sorted(set(indices))
            by_path[s["path"].decode()] = indices
        assert {p for p in by_path if p in expected} == expected
    assert all({manifest["classes"][i] for i in by_path[name]} == truth[name] for name in truth)

    shards = load_manifest(out)
    assert shards.multi_label is True and shards.split == manifest["split"]
    width = len(manifest["classes"])
    for split, train in (("train", True), ("valid", False)):
        dataset = ShardDataset(shards, split, 8, 16, train=train, seed=1)
        keys_seen = 0
        for images, labels, info in dataset:
            assert labels.dtype == np.uint8 and labels.shape == (len(info["keys"]), width) and images.shape[0] == len(info["keys"])
            keys_seen += len(info["keys"])
            for key, row in zip(info["keys"], labels):
                expected = np.zeros(width, dtype=np.uint8)
                expected[list(_tags_of(out, split, key))] = 1
                assert np.array_equal(row, expected), key
        assert keys_seen >= manifest["splits"][split]["samples"]


def _tags_of(out: Path, split: str, key: str) -> tuple[int, ...]:
    for shard in sorted(out.glob(f"{split}-*.tar")):
        with tarfile.open(shard) as tar:
            try:
                return tuple(int(t) for t in tar.extractfile(f"{key}.tags").read().split())
            except KeyError:
                continue
    raise AssertionError(f"{key} is in no {split} shard")


def test_a_multi_label_reader_skips_samples_without_usable_tags(tmp_path):
    """`.tags` is required in a multi-label shard; an index outside the classes is a bad label; an
    image with no tags at all is a sample (an all-zero row)."""
    jpeg = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 200, 30)).save(jpeg, format="JPEG")
    path = tmp_path / "tags.tar"
    with tarfile.open(path, "w") as tar:
        for key, ext, label in (("k0", "tags", b"0 2"), ("k1", "tags", b""), ("k2", "tags", b"3"), ("k3", "cls", b"1"),
                                ("k4", "tags", b"x")):
            for name, payload in ((f"{key}.{ext}", label), (f"{key}.jpg", jpeg.getvalue())):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    skipped: dict[str, int] = {}
    samples = list(read_range(path, 0, 5, skipped, num_classes=3, multi_label=True))
    assert [(s.key, s.label) for s in samples] == [("k0", (0, 2)), ("k1", ())]
    assert skipped == {"bad label": 2, "no .tags member": 1}


def _old_fingerprint(src: Path, settings: PrepareSettings) -> str:
    """The fingerprint `prepare` gave a class-folder tree before it read other sources: a finished
    output from then must still be found up to date."""
    listing = list_image_folder(src, settings.train_dir, settings.valid_dir)
    digest = hashlib.sha256(json.dumps(asdict(settings), sort_keys=True).encode())
    for split, files in (("train", listing.train), ("valid", listing.valid)):
        for path, label in files:
            stat = path.stat()
            digest.update(f"{split}\0{path}\0{label}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def test_class_folders_shard_as_before(tmp_path):
    src = make_folder(tmp_path / "src", {"train": {"a": 5, "b": 4}, "valid": {"a": 2, "b": 2}})
    before = prepare(src, tmp_path / "one", SETTINGS, workers=1, progress=False, log=_quiet)
    assert main(["prepare", str(src), str(tmp_path / "two"), "--samples-per-shard", "7", "--presize", "16", "--workers", "2",
                 "--no-progress"]) == 0
    after = json.loads((tmp_path / "two" / "manifest.json").read_text())
    assert before["source"]["fingerprint"] == after["source"]["fingerprint"] == _old_fingerprint(src, SETTINGS)
    assert list(before) == list(after) == ["format", "classes", "presize", "quality", "samples_per_shard", "seed", "source", "made",
                                           "splits"]
    assert {k: v for k, v in before.items() if k != "made"} == {k: v for k, v in after.items() if k != "made"}
    names = sorted(p.name for p in (tmp_path / "one").glob("*.tar"))
    assert names == ["train-000000.tar", "train-000001.tar", "valid-000000.tar"]
    for name in names:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name
    lines: list[str] = []
    prepare(src, tmp_path / "one", SETTINGS, workers=1, progress=False, log=lines.append, source=DataConfig())
    assert "up to date" in lines[0]


def test_cli_takes_the_source_keys_and_refuses_others(demo, tmp_path, capsys):
    src = demo["multi"]
    out = tmp_path / "cli"
    args = ["prepare", str(src), str(out), "--samples-per-shard", "7", "--presize", "16", "--workers", "1", "--no-progress",
            "data.labels=labels.csv", "data.suffix=.png", "data.label_delim= ", "data.valid_pct=0.2"]
    assert main(args) == 0
    api = prepare(src, tmp_path / "api", SETTINGS, workers=1, progress=False, log=_quiet, source=_csv_source(src, multi=True))
    cli = json.loads((out / "manifest.json").read_text())
    assert cli["multi_label"] is True and cli["split"] == api["split"]
    assert cli["source"]["fingerprint"] == api["source"]["fingerprint"]
    assert main(args) == 0 and "up to date" in capsys.readouterr().out
    assert main([*args[:-1], "data.valid_pct=0.3"]) == 2  # another split: refused without --force
    assert "--force" in capsys.readouterr().err
    for extra, said in (("data.batch_size=8", "takes only the source's data.* keys"), ("data.root=/x", "SRC is the data root"),
                        ("data.valid_pct=2", "data.valid_pct: must be in [0, 1)")):
        assert main([*args, extra]) == 2
        err = capsys.readouterr().err
        assert said in err and err.count("\n") == 1 and "Traceback" not in err
    assert main(["prepare", str(src), str(out), "--train-dir", "a", "data.train_dir=b"]) == 2
    assert "both set" in capsys.readouterr().err


def test_a_split_that_leaves_a_part_empty_is_one_clear_error(demo, tmp_path):
    with pytest.raises(DataError, match="no validation images; shards need both parts"):
        prepare(demo["csv"], tmp_path / "out", SETTINGS, workers=1, progress=False, log=_quiet,
                source=DataConfig(labels="labels.csv", suffix=".png", valid_pct=0.0))


def test_a_changed_label_is_a_changed_source(demo, tmp_path):
    src = tmp_path / "csv"
    shutil.copytree(demo["csv"], src)
    prepare(src, tmp_path / "out", SETTINGS, workers=1, progress=False, log=_quiet, source=_csv_source(src))
    table = src / "labels.csv"
    header, first, *rest = table.read_text().splitlines()
    name, label = first.split(",")
    table.write_text("\n".join([header, f"{name},{(int(label) + 1) % 10}", *rest]) + "\n")
    with pytest.raises(DataError, match="another source or with other settings"):
        prepare(src, tmp_path / "out", SETTINGS, workers=1, progress=False, log=_quiet, source=_csv_source(src))
