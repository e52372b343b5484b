"""Content addressing: ids derived from everything that determines a published thing's bytes."""

from __future__ import annotations

import hashlib
import json
from typing import Any

ID_LENGTH = 20  # hex chars: 80 bits, collision-free for any realistic number of sets


def canonical_json(obj: Any) -> str:
    """JSON with sorted keys and no whitespace, so equal specs hash equally."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def content_id(spec: dict[str, Any]) -> str:
    """A short, stable id for ``spec``: the same inputs always give the same id."""
    return hashlib.sha256(canonical_json(spec).encode()).hexdigest()[:ID_LENGTH]


def sha256_bytes(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path, chunk: int = 8 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
