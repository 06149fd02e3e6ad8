"""data.cache: a folder's decoded images kept in shared memory after their first decode."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import make_folder
from disttrain.data.folder import DataError, scan_image_folder
from disttrain.data.loader import FolderDataset, RankBatchSampler, make_loader
from disttrain.data.setup import use_cache


def _epoch(dataset: FolderDataset, workers: int) -> torch.Tensor:
    sampler = RankBatchSampler(len(dataset), 4, shuffle=False, drop_empty=True)
    return torch.cat([images for images, _ in make_loader(dataset, workers, False, sampler, timeout=60)])


@pytest.mark.parametrize("workers", [0, 1])
def test_a_second_epoch_reads_the_first_epochs_pixels_without_the_files(tmp_path, workers):
    make_folder(tmp_path, {"train": {"a": 5, "b": 4}, "valid": {"a": 1, "b": 1}})
    split = scan_image_folder(tmp_path).train
    cached, plain = FolderDataset(split, 24, cache=True), FolderDataset(split, 24)
    first = _epoch(cached, workers)  # the loader's worker (forkserver) decodes into the shared array
    assert bool(cached.filled.all()) and cached.cache_bytes == len(split.paths) * 24 * 24 * 3
    assert torch.equal(first, _epoch(plain, 0))  # the same pixels as decoding
    for path in split.paths:
        Path(path).unlink()  # only the cache can serve them now
    assert torch.equal(_epoch(cached, workers), first)
    with pytest.raises(DataError, match="could not be decoded"):
        plain[0]


def test_the_cache_is_taken_when_it_fits_and_as_set():
    assert use_cache("auto", 10 * 2**20) and not use_cache("auto", 2**50)
    assert use_cache("on", 2**50) and not use_cache("off", 1)
