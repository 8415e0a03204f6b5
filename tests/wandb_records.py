"""Reader for the records of an offline W&B run file (`run-<id>.wandb`).

The file is a LevelDB-style log: a 7-byte header (":W&B", a 2-byte magic number and a
version byte), then 32 KiB blocks of chunks, each with a 7-byte header (CRC-32, length,
chunk type). Chunks join into protobuf `Record` messages of `wandb_internal_pb2`.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path

from wandb.proto import wandb_internal_pb2

FILE_HEADER = 7
BLOCK_SIZE = 32 * 1024
CHUNK_HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def read_records(path: Path) -> Iterator[wandb_internal_pb2.Record]:
    data = Path(path).read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path} is not a W&B run file: it starts with {data[:4]!r}")
    offset = FILE_HEADER
    pending = b""
    while offset + CHUNK_HEADER <= len(data):
        space_in_block = BLOCK_SIZE - offset % BLOCK_SIZE
        if space_in_block < CHUNK_HEADER:
            offset += space_in_block  # the block's tail is padding
            continue
        _, length, chunk_type = struct.unpack("<IHB", data[offset : offset + CHUNK_HEADER])
        if chunk_type == 0 and length == 0:
            offset += space_in_block
            continue
        payload = data[offset + CHUNK_HEADER : offset + CHUNK_HEADER + length]
        offset += CHUNK_HEADER + length
        if chunk_type in (FULL, FIRST):
            pending = payload
        else:
            pending += payload
        if chunk_type in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


def read_history(path: Path) -> list[dict]:
    """Return the rows logged with `wandb.log`, each as {key: decoded JSON value}."""
    rows = []
    for record in read_records(path):
        if record.WhichOneof("record_type") == "history":
            rows.append(
                {
                    item.key or "/".join(item.nested_key): json.loads(item.value_json)
                    for item in record.history.item
                }
            )
    return rows


def read_config(path: Path) -> dict:
    """Return the run config as {key: decoded JSON value}, later updates winning."""
    config = {}
    for record in read_records(path):
        record_type = record.WhichOneof("record_type")
        updates = ()
        if record_type == "run":
            updates = record.run.config.update
        elif record_type == "config":
            updates = record.config.update
        for item in updates:
            config[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    return config


def read_summary(path: Path) -> dict:
    """Return the run summary as {key: decoded JSON value}, later updates winning."""
    summary = {}
    for record in read_records(path):
        if record.WhichOneof("record_type") == "summary":
            for item in record.summary.update:
                summary[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    return summary


def read_run(path: Path) -> dict:
    """Return the identity of the run: id, name (display name), group, job type and tags."""
    for record in read_records(path):
        if record.WhichOneof("record_type") == "run":
            run = record.run
            return {
                "id": run.run_id,
                "name": run.display_name,
                "group": run.run_group,
                "job_type": run.job_type,
                "tags": list(run.tags),
            }
    raise ValueError(f"{path} holds no run record")
