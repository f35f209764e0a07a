"""A reader for W&B's offline transaction log (`run-*.wandb`), which wandb itself no longer ships.

The file is a 7-byte header (b":W&B", 2 magic bytes, a version byte), then LevelDB-log
records in 32 KiB blocks: each chunk has a 7-byte header (crc32c uint32, length uint16,
type uint8: 1 full, 2 first, 3 middle, 4 last) and a block's tail too short for a header is
padding. Each record is a serialized `wandb_internal_pb2.Record`.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from wandb.proto import wandb_internal_pb2

BLOCK = 32 * 1024
HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def read_records(path: Path) -> list[wandb_internal_pb2.Record]:
    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B transaction log"
    records, pending, pos = [], b"", HEADER
    while pos + HEADER <= len(data):
        if BLOCK - pos % BLOCK < HEADER:  # block trailer
            pos += BLOCK - pos % BLOCK
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + HEADER])
        chunk = data[pos + HEADER : pos + HEADER + length]
        pos += HEADER + length
        if kind in (FULL, FIRST):
            pending = chunk
        elif kind in (MIDDLE, LAST):
            pending += chunk
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def history_keys(records: list[wandb_internal_pb2.Record]) -> set[str]:
    """Every key a `history` record (a logged step) carries."""
    return {
        item.key or "/".join(item.nested_key)
        for r in records
        if r.WhichOneof("record_type") == "history"
        for item in r.history.item
    }


def config_values(records: list[wandb_internal_pb2.Record]) -> dict:
    """The run's config as logged: top-level key -> decoded JSON value."""
    return {
        item.key: json.loads(item.value_json)
        for r in records
        if r.WhichOneof("record_type") == "config"
        for item in r.config.update
    }
