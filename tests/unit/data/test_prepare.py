"""`disttrain prepare`: bad files listed, idempotent re-runs, and a kill mid-run that loses nothing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import tarfile
import time
from pathlib import Path

import pytest
import torch

from conftest import BIN, make_folder, run_env
from disttrain.data.decode import decode_jpeg_batch, load_presized
from disttrain.data.folder import DataError
from disttrain.data.prepare import PrepareSettings, prepare


def _quiet(_: str) -> None:
    pass


def _tar_keys(path: Path) -> list[str]:
    """Keys of a shard; raises if the tar is incomplete."""
    with tarfile.open(path) as tar:
        names = [m.name for m in tar.getmembers()]
    keys = sorted({n.split(".")[0] for n in names})
    assert sorted(names) == sorted(f"{k}.{e}" for k in keys for e in ("cls", "jpg", "path"))
    return keys


def test_bad_files_are_skipped_and_listed(tmp_path):
    src = make_folder(tmp_path / "src", {"train": {"a": 5, "b": 5}, "valid": {"a": 2, "b": 2}})
    (src / "train" / "a" / "empty.jpg").write_bytes(b"")
    (src / "train" / "b" / "text.png").write_text("not an image")
    manifest = prepare(src, tmp_path / "out", PrepareSettings(samples_per_shard=4), workers=1, progress=False, log=_quiet)
    train = manifest["splits"]["train"]
    assert train["samples"] == 10 and sum(s["samples"] for s in train["shards"]) == 10
    reasons = {Path(b["path"]).name: b["reason"] for b in train["bad_files"]}
    assert set(reasons) == {"empty.jpg", "text.png"} and "empty" in reasons["empty.jpg"]
    assert json.loads((tmp_path / "out" / "manifest.json").read_text()) == manifest


def test_rerun_is_a_no_op_and_a_changed_source_needs_force(tmp_path):
    src = make_folder(tmp_path / "src", {"train": {"a": 6, "b": 6}, "val": {"a": 2, "b": 2}})
    out = tmp_path / "out"
    first = prepare(src, out, PrepareSettings(samples_per_shard=5), workers=2, progress=False, log=_quiet)
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    lines = []
    assert prepare(src, out, PrepareSettings(samples_per_shard=5), workers=2, progress=False, log=lines.append) == first
    assert "up to date" in lines[0]
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamps

    with pytest.raises(DataError, match="another source or with other settings.*--force"):
        prepare(src, out, PrepareSettings(samples_per_shard=5, presize=64), workers=1, progress=False, log=_quiet)
    make_folder(src, {"train": {"c": 3}})
    with pytest.raises(DataError, match="--force"):
        prepare(src, out, PrepareSettings(samples_per_shard=5), workers=1, progress=False, log=_quiet)
    forced = prepare(src, out, PrepareSettings(samples_per_shard=5), workers=1, force=True, progress=False, log=_quiet)
    assert forced["classes"] == ["a", "b", "c"] and forced["splits"]["train"]["samples"] == 15
    assert sorted(p.name for p in out.glob("*.tar")) == [s["name"] for split in forced["splits"].values() for s in split["shards"]]


def test_same_input_gives_the_same_bytes(tmp_path):
    src = make_folder(tmp_path / "src", {"train": {"a": 4, "b": 4}, "valid": {"a": 1, "b": 1}})
    prepare(src, tmp_path / "one", PrepareSettings(samples_per_shard=3), workers=1, progress=False, log=_quiet)
    prepare(src, tmp_path / "two", PrepareSettings(samples_per_shard=3), workers=2, progress=False, log=_quiet)
    names = sorted(p.name for p in (tmp_path / "one").glob("*.tar"))
    assert names == ["train-000000.tar", "train-000001.tar", "train-000002.tar", "valid-000000.tar"]
    assert sorted(p.name for p in (tmp_path / "two").glob("*.tar")) == names
    for name in names:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name


def test_shards_are_plain_tars_with_fixed_headers(tmp_path):
    """What keeps the bytes reproducible and the shards standard webdataset: per sample KEY.cls,
    KEY.jpg, KEY.path in that order, regular files with mtime 0, mode 0444, owner disttrain (uid 0),
    no pax headers; the label and the path under the split folder as text."""
    src = make_folder(tmp_path / "src", {"train": {"a": 2, "b": 1}, "valid": {"a": 1}})
    prepare(src, tmp_path / "out", PrepareSettings(samples_per_shard=10), workers=1, progress=False, log=_quiet)
    with tarfile.open(tmp_path / "out" / "train-000000.tar") as tar:
        members = tar.getmembers()
        assert [m.name for m in members] == [f"{k:08d}.{e}" for k in range(3) for e in ("cls", "jpg", "path")]
        assert {(m.type, m.mtime, m.mode, m.uname, m.gname, m.uid, m.gid, m.pax_headers == {}) for m in members} == {
            (tarfile.REGTYPE, 0, 0o444, "disttrain", "disttrain", 0, 0, True)
        }
        text = {m.name: tar.extractfile(m).read().decode() for m in members if not m.name.endswith(".jpg")}
    pairs = {(text[f"{k:08d}.path"], text[f"{k:08d}.cls"]) for k in range(3)}
    assert pairs == {("a/000.png", "0"), ("a/001.png", "0"), ("b/000.png", "1")}


# Runs `disttrain prepare` with a hook that holds the process still at a chosen sample: the test
# kills it there, so the kill lands at the same point of the run on any machine.
HOLD_AT_SAMPLE = """
import os, signal, sys
from pathlib import Path

import disttrain.data.prepare as prepare_module
from disttrain.cli import main

marker, hold_at = Path(sys.argv[1]), int(sys.argv[2])
real_encode, calls = prepare_module.encode_sample, 0


def encode_or_hold(*args, **kwargs):
    global calls
    calls += 1
    if calls == hold_at:
        marker.write_text(str(os.getpid()))
        signal.pause()  # until the test's SIGKILL
    return real_encode(*args, **kwargs)


prepare_module.encode_sample = encode_or_hold  # write_shard looks it up at each call
sys.exit(main(sys.argv[3:]))
"""


def test_killed_mid_run_then_resumed(tmp_path):
    """SIGKILL while the 6th shard is being written (5 finished): no manifest, the 5 finished shards
    complete and recorded, the 6th only under its temporary name; the re-run keeps the 5 as they are,
    writes the other 39 and ends with every sample once."""
    src = make_folder(tmp_path / "src", {"train": {"a": 60, "b": 60}, "valid": {"a": 5, "b": 5}}, size=(64, 48))
    out, marker = tmp_path / "out", tmp_path / "holding"
    args = ["prepare", str(src), str(out), "--samples-per-shard", "3", "--workers", "1", "--no-progress"]
    finished, in_shard = 5, 2  # hold before encoding the 3rd sample of the 6th shard
    proc = subprocess.Popen([str(BIN / "python"), "-c", HOLD_AT_SAMPLE, str(marker), str(finished * 3 + in_shard + 1), *args],
                            env=run_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():  # polling for the hook's marker, not timing the run
            assert proc.poll() is None, f"prepare ended before the hold point:\n{proc.stdout.read().decode()}"
            assert time.monotonic() < deadline, "the hold point was not reached"
            time.sleep(0.02)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL

    done = [f"train-{n:06d}.tar" for n in range(finished)]
    assert sorted(p.name for p in out.glob("*.tar")) == done
    assert sorted(p.name for p in out.glob("*.tmp")) == [f"train-{finished:06d}.tar.tmp"]  # the unfinished one
    assert not (out / "manifest.json").exists()
    records = [json.loads(line) for line in (out / ".prepare-progress.jsonl").read_text().splitlines()]
    assert [r["name"] for r in records] == done
    for n, name in enumerate(done):
        assert _tar_keys(out / name) == [f"{3 * n + i:08d}" for i in range(3)]
        assert records[n]["bytes"] == (out / name).stat().st_size and records[n]["samples"] == 3
    kept = {name: ((out / name).stat().st_ino, (out / name).stat().st_mtime_ns) for name in done}

    resumed = subprocess.run([str(BIN / "disttrain"), *args], env=run_env(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming, {finished} shard(s) already written, {44 - finished} to go" in resumed.stdout
    assert {name: ((out / name).stat().st_ino, (out / name).stat().st_mtime_ns) for name in done} == kept, "finished shards rewritten"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["splits"]["train"]["samples"] == 120 and manifest["splits"]["valid"]["samples"] == 10
    assert [s["name"] for s in manifest["splits"]["train"]["shards"]] == [f"train-{n:06d}.tar" for n in range(40)]
    assert sorted(p.name for p in out.glob("*.tar")) == [f"train-{n:06d}.tar" for n in range(40)] + [f"valid-{n:06d}.tar" for n in range(4)]
    keys = [k for shard in sorted(out.glob("train-*.tar")) for k in _tar_keys(shard)]
    assert keys == [f"{i:08d}" for i in range(120)]
    assert [k for shard in sorted(out.glob("valid-*.tar")) for k in _tar_keys(shard)] == [f"{i:08d}" for i in range(10)]
    assert not list(out.glob("*.tmp")) and not (out / ".prepare-progress.jsonl").exists()


def test_cli_prepare_errors_are_one_line(tmp_path):
    proc = subprocess.run([str(BIN / "disttrain"), "prepare", str(tmp_path / "nope"), str(tmp_path / "out")],
                          env=run_env(), capture_output=True, text=True)
    assert proc.returncode == 2 and "is not a folder" in proc.stderr and "Traceback" not in proc.stderr


def test_batched_decoder_presizes_like_the_cpu_path_and_leaves_out_bad_payloads(tmp_path):
    """`decode_jpeg_batch` (nvJPEG on CUDA) run here on the CPU: same sizes as the PIL path, close
    pixels, and a bad payload left out, its position missing from the decoded ones (what takes its
    place is the loader's: tests/unit/test_decode_labels.py)."""
    src = make_folder(tmp_path / "src", {"train": {"a": 3}, "valid": {"a": 1}}, size=(40, 30))
    prepare(src, tmp_path / "out", PrepareSettings(samples_per_shard=10, presize=30, quality=95), workers=1, progress=False, log=_quiet)
    with tarfile.open(tmp_path / "out" / "train-000000.tar") as tar:
        jpegs = [tar.extractfile(m).read() for m in tar.getmembers() if m.name.endswith(".jpg")]
    payloads = [torch.frombuffer(bytearray(j), dtype=torch.uint8) for j in jpegs]
    batch, decoded = decode_jpeg_batch(payloads, 24, torch.device("cpu"))
    assert decoded == [0, 1, 2] and batch.shape == (3, 3, 24, 24) and batch.dtype == torch.uint8
    for image, jpeg in zip(batch, jpegs):
        assert (image.permute(1, 2, 0).float() - torch.from_numpy(load_presized(jpeg, 24)).float()).abs().mean() < 3.0
    bad = payloads[:1] + [torch.frombuffer(bytearray(b"garbage" * 10), dtype=torch.uint8)] + payloads[2:]
    left, decoded = decode_jpeg_batch(bad, 24, torch.device("cpu"))
    assert decoded == [0, 2] and left.shape == (2, 3, 24, 24)
    assert torch.equal(left[0], batch[0]) and torch.equal(left[1], batch[2])

