"""Each process's log lines carry its rank: the training processes' and their loader workers' (a
corrupt shard sample warned about in a worker names the rank it decodes for). Below the data layer,
so a loader worker sets it up without importing the tracker."""

from __future__ import annotations

import logging


def setup_logging(rank: int, is_main: bool) -> None:
    """Warnings and errors only, each line carrying the rank (other ranks print nothing else)."""
    logging.basicConfig(level=logging.INFO if is_main else logging.WARNING,
                        format=f"[rank {rank}] %(levelname)s %(name)s: %(message)s", force=True)
    logging.captureWarnings(True)
