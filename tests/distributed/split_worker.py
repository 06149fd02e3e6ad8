"""Run by tests/distributed/test_flat_sources.py under a real launcher: the real run (as launch/train.py
runs it) with one test-only hook:

    split_worker.py OUT CONFIG [section.key=value ...]

Every rank writes OUT/split-rank<R>.json with the validation files and the digest of the split IT
drew (disttrain.data.source.list_source, called by every rank in disttrain/data/setup.py), as soon as
it has drawn it: before the ranks compare their digests or anything is broadcast.
"""

import json
import os
import sys
from pathlib import Path

import disttrain.data.setup as setup
from disttrain.cli import run_user_errors
from disttrain.models.checks import load_config
from disttrain.train.run import train

out, config, words = Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
real_list_source = setup.list_source


def list_and_record(data):
    listing = real_list_source(data)
    rank = int(os.environ.get("RANK", "0"))
    record = {"digest": listing.split.digest, "valid": [str(path) for path, _ in listing.valid], "how": listing.split.how,
              "train": len(listing.train)}
    (out / f"split-rank{rank}.json").write_text(json.dumps(record))
    return listing


if __name__ == "__main__":  # loader workers import this script again (disttrain/data/workers.py)
    setup.list_source = list_and_record  # looked up in disttrain.data.setup when agreed_listing runs
    sys.exit(run_user_errors(lambda: train(load_config(config, words))))
