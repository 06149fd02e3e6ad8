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
    for shard in (tmp_path / "one").glob("*.tar"):
        assert shard.read_bytes() == (tmp_path / "two" / shard.name).read_bytes()


def test_killed_mid_run_then_resumed(tmp_path):
    """SIGKILL while shards are being written: no manifest, every finished-looking shard complete;
    the re-run writes only what is missing and ends with every sample once."""
    src = make_folder(tmp_path / "src", {"train": {"a": 60, "b": 60}, "valid": {"a": 5, "b": 5}}, size=(64, 48))
    out = tmp_path / "out"
    cmd = [str(BIN / "disttrain"), "prepare", str(src), str(out), "--samples-per-shard", "3", "--workers", "1", "--no-progress"]
    proc = subprocess.Popen(cmd, env=run_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 120
    while len(list(out.glob("*.tar"))) < 3 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)  # polling for a condition (shards on disk), not synchronizing on time
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    written = sorted(out.glob("*.tar"))
    assert 3 <= len(written) < 44, "the kill should land mid-run"
    assert not (out / "manifest.json").exists()
    for shard in written:
        assert len(_tar_keys(shard)) == 3

    resumed = subprocess.run(cmd, env=run_env(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["splits"]["train"]["samples"] == 120 and manifest["splits"]["valid"]["samples"] == 10
    keys = [k for shard in sorted(out.glob("train-*.tar")) for k in _tar_keys(shard)]
    assert sorted(keys) == [f"{i:08d}" for i in range(120)]
    assert not list(out.glob("*.tmp")) and not (out / ".prepare-progress.jsonl").exists()


def test_cli_prepare_errors_are_one_line(tmp_path):
    proc = subprocess.run([str(BIN / "disttrain"), "prepare", str(tmp_path / "nope"), str(tmp_path / "out")],
                          env=run_env(), capture_output=True, text=True)
    assert proc.returncode == 2 and "is not a folder" in proc.stderr and "Traceback" not in proc.stderr


def test_batched_decoder_presizes_like_the_cpu_path_and_replaces_bad_payloads(tmp_path):
    """`decode_jpeg_batch` (nvJPEG on CUDA) run here on the CPU: same sizes as the PIL path, close
    pixels, and a bad payload replaced by another image of the batch and counted."""
    src = make_folder(tmp_path / "src", {"train": {"a": 3}, "valid": {"a": 1}}, size=(40, 30))
    prepare(src, tmp_path / "out", PrepareSettings(samples_per_shard=10, presize=30, quality=95), workers=1, progress=False, log=_quiet)
    with tarfile.open(tmp_path / "out" / "train-000000.tar") as tar:
        jpegs = [tar.extractfile(m).read() for m in tar.getmembers() if m.name.endswith(".jpg")]
    payloads = [torch.frombuffer(bytearray(j), dtype=torch.uint8) for j in jpegs]
    batch, failed = decode_jpeg_batch(payloads, 24, torch.device("cpu"))
    assert failed == 0 and batch.shape == (3, 3, 24, 24) and batch.dtype == torch.uint8
    for image, jpeg in zip(batch, jpegs):
        assert (image.permute(1, 2, 0).float() - torch.from_numpy(load_presized(jpeg, 24)).float()).abs().mean() < 3.0
    bad = payloads[:1] + [torch.frombuffer(bytearray(b"garbage" * 10), dtype=torch.uint8)] + payloads[2:]
    replaced, failed = decode_jpeg_batch(bad, 24, torch.device("cpu"))
    assert failed == 1 and replaced.shape == (3, 3, 24, 24)
    assert torch.equal(replaced[0], batch[0]) and torch.equal(replaced[2], batch[2])
    assert any(torch.equal(replaced[1], batch[i]) for i in (0, 2))

