"""Read an offline W&B run file (run-*.wandb) to check what would be uploaded.

wandb 0.2x dropped its Python reader of these files, and offline runs no longer write
files/config.yaml or wandb-summary.json, so the test reads the records itself. The file is a
7-byte ':W&B' header, then LevelDB-log framing (32 KiB blocks; each chunk has a 7-byte header:
crc32c, little-endian length, type FULL=1/FIRST=2/MIDDLE=3/LAST=4) around protobuf Records.
"""

from __future__ import annotations

import json
from pathlib import Path

from wandb.proto import wandb_internal_pb2 as pb

BLOCK = 32 * 1024
HEADER = 7


def records(path: Path) -> list:
    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    out, pos, buf = [], HEADER, b""
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:  # block trailer padding
            pos += left
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        if kind == 0:
            pos += left
            continue
        chunk = data[pos + HEADER:pos + HEADER + length]
        pos += HEADER + length
        buf = chunk if kind in (1, 2) else buf + chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(buf)
            out.append(record)
    return out


def _items(items) -> dict:
    return {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in items}


def run_contents(path: Path) -> dict:
    """{'name', 'group', 'project', 'config', 'summary', 'history_keys'} from an offline run file."""
    out: dict = {"config": {}, "summary": {}, "history_keys": set()}
    for record in records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            out.update(name=record.run.display_name, group=record.run.run_group, project=record.run.project)
            out["config"].update(_items(record.run.config.update))
        elif kind == "config":
            out["config"].update(_items(record.config.update))
        elif kind == "summary":
            out["summary"].update(_items(record.summary.update))
        elif kind == "history":
            out["history_keys"].update(item.key or "/".join(item.nested_key) for item in record.history.item)
    return out
