"""Read a W&B run file (`run-<id>.wandb`) offline, as the tests do: a header (`:W&B`, a 2-byte magic,
a version byte), then a LevelDB-style log of protobuf `Record`s in 32 KiB blocks (each chunk: crc32
4 bytes, length 2 bytes, type 1 byte: full / first / middle / last). The file of a killed run may
end inside a chunk: reading stops at the last complete record."""

from __future__ import annotations

import json
import struct
from pathlib import Path

BLOCK = 32768
HEADER = 7
FULL, FIRST, LAST = 1, 2, 4


def read_records(path: str | Path) -> list:
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path}: not a W&B run file"
    records, pending, pos = [], b"", HEADER
    while pos + HEADER <= len(data):
        left_in_block = BLOCK - pos % BLOCK
        if left_in_block < HEADER:  # block trailer: zero padding
            pos += left_in_block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + HEADER])
        if pos + HEADER + length > len(data):  # cut by a kill
            break
        chunk = data[pos + HEADER : pos + HEADER + length]
        pos += HEADER + length
        if kind == 0:
            continue
        pending = chunk if kind in (FULL, FIRST) else pending + chunk
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def _key(item) -> str:
    return item.key or "/".join(item.nested_key)


def history(records) -> list[dict]:
    """Every history row (one per logged step) as {key: decoded JSON value}."""
    return [{_key(i): json.loads(i.value_json) for i in r.history.item} for r in records if r.WhichOneof("record_type") == "history"]


def media(row: dict, key: str) -> dict:
    """A logged W&B object (Table, Image) of a history row: its fields (`_type`, `path`, ...), which
    the record stores as nested keys under `key`."""
    prefix = key + "/"
    return {k[len(prefix):]: v for k, v in row.items() if k.startswith(prefix)}


def summary(records) -> dict:
    out = {}
    for r in records:
        if r.WhichOneof("record_type") == "summary":
            out.update({_key(i): json.loads(i.value_json) for i in r.summary.update})
    return out


def run_record(records):
    return next(r.run for r in records if r.WhichOneof("record_type") == "run")


def config(records) -> dict:
    """The run's config as wandb stores it ({key: {"value": ...}} or {key: value})."""
    out = {}
    for item in run_record(records).config.update:
        out[_key(item)] = json.loads(item.value_json)
    for r in records:
        if r.WhichOneof("record_type") == "config":
            out.update({_key(i): json.loads(i.value_json) for i in r.config.update if _key(i)})
    return {k: v["value"] if isinstance(v, dict) and "value" in v and set(v) <= {"value", "desc"} else v for k, v in out.items()}


def artifact_files(records) -> dict[str, str]:
    """The files of the run's logged artifacts (a Table with images is one): {path in the artifact:
    the local file W&B staged it in}."""
    return {entry.path: entry.local_path for r in records if r.WhichOneof("record_type") == "artifact"
            for entry in r.artifact.manifest.contents}
