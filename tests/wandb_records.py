"""Read a W&B run file (``run-<id>.wandb``) back: the records wandb-core wrote, decoded with
wandb's own protobuf schema (wandb.proto.wandb_internal_pb2.Record).

wandb >= 0.2x has no Python reader of its own. The file is LevelDB's log format with W&B's
header: 7 bytes (":W&B", magic 0xBEE1, version 0), then 32 KiB blocks of chunks, each with a
7-byte header (CRC32C, length, type: full / first / middle / last); a block's tail shorter
than a header is zero padding.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

HEADER = struct.Struct("<4sHB")
CHUNK = struct.Struct("<IHB")
BLOCK = 32768
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: str | Path):
    """Every Record of the run file, in order."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    ident, magic, version = HEADER.unpack_from(data, 0)
    if ident != b":W&B" or magic != 0xBEE1 or version != 0:
        raise ValueError(f"{path}: not a W&B run file (header {ident!r} {magic:#x} {version})")
    pos, parts = HEADER.size, []
    while pos + CHUNK.size <= len(data):
        left = BLOCK - pos % BLOCK
        if left < CHUNK.size:  # zero padding at a block's end
            pos += left
            continue
        _crc, length, kind = CHUNK.unpack_from(data, pos)
        if kind == 0 and length == 0:  # zeros: the rest of the block is padding
            pos += left
            continue
        body = data[pos + CHUNK.size: pos + CHUNK.size + length]
        pos += CHUNK.size + length
        parts.append(body)
        if kind in (FULL, LAST):
            record = pb.Record()
            record.ParseFromString(b"".join(parts))
            parts = []
            yield record


def history(path: str | Path) -> list[dict]:
    """The run's logged rows (``wandb.log``), keys joined with "/", values decoded."""
    rows = []
    for record in records(path):
        if record.WhichOneof("record_type") != "history":
            continue
        row = {}
        for item in record.history.item:
            key = "/".join(item.nested_key) if item.nested_key else item.key
            row[key] = json.loads(item.value_json) if item.value_json else None
        rows.append(row)
    return rows


def config(path: str | Path) -> dict:
    """The run's config (the last value of each key)."""
    out = {}
    for record in records(path):
        kind = record.WhichOneof("record_type")
        updates = (record.config.update if kind == "config" else
                   record.run.config.update if kind == "run" else ())
        for item in updates:
            key = "/".join(item.nested_key) if item.nested_key else item.key
            out[key] = json.loads(item.value_json)
    return out


def run_info(path: str | Path) -> dict:
    """The run record's id, group, job type and project."""
    for record in records(path):
        if record.WhichOneof("record_type") == "run":
            r = record.run
            return {"run_id": r.run_id, "group": r.run_group, "job_type": r.job_type,
                    "project": r.project, "display_name": r.display_name}
    return {}
