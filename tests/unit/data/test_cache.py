"""data.cache: a folder's decoded images kept in shared memory after their first decode."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from conftest import make_folder
from disttrain.config import Config
from disttrain.data.folder import scan_image_folder
from disttrain.data.loader import FolderDataset, RankBatchSampler, Workers, make_loader
from disttrain.data.setup import build_loaders, use_cache


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
    assert plain[0] is None  # decoding now fails: the loader's collate counts it (tests/unit/data/test_verify.py)


def test_the_cache_is_taken_when_it_fits_and_as_set():
    assert use_cache("auto", 10 * 2**20) and not use_cache("auto", 2**50)
    assert use_cache("on", 2**50) and not use_cache("off", 1)


def test_a_rank_caches_only_its_validation_share_and_takes_pages_as_it_fills_them(tmp_path):
    """3 ranks: each rank's validation cache has room for the images it reads (its fixed share),
    not the whole split; the training cache holds the whole split (a rank reads other images every
    epoch). A rank's loaders (the accelerator is the one input they read: its rank, world size and
    device) hold exactly what data.cache=auto sized. Before a slot is filled, its pages are not
    resident (the array is allocated, not written, up front)."""
    make_folder(tmp_path, {"train": {"a": 4, "b": 3}, "valid": {"a": 7, "b": 6}})
    data = scan_image_folder(tmp_path)
    cfg = Config()
    cfg.data.num_workers, cfg.data.cache = 0, "on"
    image = 24 * 24 * 3
    shares = []
    for rank in range(3):
        rank_of_3 = SimpleNamespace(num_processes=3, process_index=rank, device=torch.device("cpu"))
        train, valid = build_loaders(cfg, data, rank_of_3, Workers(0), load_size=24, batch_size=2)
        share = [i for batch in valid.source for i in batch]
        assert valid.cache_bytes == len(share) * image and train.cache_bytes == len(data.train) * image
        dataset = valid.loader.dataset
        resident = _resident(dataset.pixels)
        images = torch.cat([images.permute(0, 2, 3, 1) for images, _ in valid])  # the rank's validation pass
        assert bool(dataset.filled.all()) and _resident(dataset.pixels) - resident >= valid.cache_bytes
        assert torch.equal(images, torch.stack([FolderDataset(data.valid, 24)[i][0] for i in share]))
        assert torch.equal(torch.cat([images for images, _ in valid]).permute(0, 2, 3, 1), images)  # read back from the cache
        shares += share
    assert sorted(shares) == list(range(len(data.valid)))  # every image once across ranks
    outside = FolderDataset(data.valid, 24, cache=[0, 1])
    assert torch.equal(outside[5][0], FolderDataset(data.valid, 24)[5][0]) and not bool(outside.filled.any())  # decoded, not cached


def _resident(tensor: torch.Tensor) -> int:
    """Bytes of the process's shared memory that are resident (RssShmem): a cache's pages count once written."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssShmem:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no RssShmem in /proc/self/status")
