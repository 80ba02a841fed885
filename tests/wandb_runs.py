"""Reading W&B's offline run files back, for the tests that check what reached W&B."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any


def wandb_records(path: Path) -> Iterator[Any]:
    """The protobuf records of a W&B run file (``run-<id>.wandb``): a 7-byte header (':W&B', magic, version),
    then LevelDB's log format (32 KiB blocks of chunks, each with a 7-byte header: CRC, length, type)."""
    import struct

    from wandb.proto import wandb_internal_pb2

    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B"
    at, chunks = 7, b""
    while at + 7 <= len(data):
        left = block - at % block
        _crc, length, kind = struct.unpack("<IHB", data[at:at + 7])
        if left < 7 or (kind == 0 and length == 0):  # a block's padding
            at += left
            continue
        if at + 7 + length > len(data):  # a record still being written
            return
        chunks += data[at + 7:at + 7 + length]
        at += 7 + length
        if kind in (1, 4):  # a whole record, or the last chunk of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunks)
            yield record
            chunks = b""


def logged_values(path: Path, key: str) -> list[str]:
    """The values of ``key`` in every history record of a run file, in order (as W&B stores them: JSON text)."""
    return [i.value_json for r in wandb_records(path) if r.WhichOneof("record_type") == "history"
            for i in r.history.item if (i.key or "/".join(i.nested_key)) == key]
