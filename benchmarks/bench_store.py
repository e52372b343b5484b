"""Store benchmark: read throughput of the storage backends against plain file reads.

Local store (files in the page cache, so this measures the software path, not the disk):

- ``LocalStore.get_range`` over every file in 1 MiB ranges (one open per call, as the
  stateless API must) against plain ``open()`` once per file and ``read(1 MiB)`` in a loop;
- ``LocalStore.get_bytes`` of whole objects against ``open().read()`` of the same files.

If ``AWS_ENDPOINT_URL`` is set (e.g. by ``eval "$(deploy/radosgw.sh start)"``), the same files are
uploaded under a fresh prefix of ``--s3-bucket`` and ``S3Store.get_bytes`` / ``get_range`` (1 MiB)
throughput is reported against the local store's (report only; the prefix is removed after).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import uuid
from pathlib import Path

import numpy as np
from _common import Figure, base_parser, interleaved, median, paired_ratios, print_environment, report, wall

from vitscope.store import LocalStore, Store

MiB = 1 << 20


def parse_args() -> argparse.Namespace:
    p = base_parser(__doc__, repeats=5)
    p.add_argument("--files", type=int, default=8)
    p.add_argument("--file-mib", type=int, default=32, help="size of each file")
    p.add_argument("--range-kib", type=int, default=1024, help="size of each ranged read")
    p.add_argument("--s3-bucket", default="vitscope-bench", help="bucket for the S3 part (created if missing)")
    args = p.parse_args()
    if args.quick:
        args.files, args.file_mib, args.repeats = 4, 8, 1
    return args


def read_ranges(store: Store, keys: list[str], size: int, chunk: int) -> None:
    for key in keys:
        for start in range(0, size, chunk):
            store.get_range(key, start, min(chunk, size - start))


def read_whole(store: Store, keys: list[str]) -> None:
    for key in keys:
        store.get_bytes(key)


def local(store: LocalStore, keys: list[str], size: int, chunk: int, args: argparse.Namespace) -> None:
    paths = [store.root / k for k in keys]

    def plain_ranges() -> None:
        for p in paths:
            with open(p, "rb") as f:
                while f.read(chunk):
                    pass

    def plain_whole() -> None:
        for p in paths:
            with open(p, "rb") as f:
                f.read()

    t = interleaved({
        "store_range": wall(lambda: read_ranges(store, keys, size, chunk)), "plain_range": wall(plain_ranges),
        "store_whole": wall(lambda: read_whole(store, keys)), "plain_whole": wall(plain_whole),
    }, args.repeats)
    mib = len(keys) * size / MiB
    report(f"local store: {len(keys)} files x {size // MiB} MiB, ranges of {chunk // 1024} KiB, page cache warm", [
        Figure("LocalStore.get_range", mib / median(t["store_range"]), "MiB/s"),
        Figure("open() once per file + read(range) loop", mib / median(t["plain_range"]), "MiB/s"),
        Figure.ratio("ratio get_range / plain", paired_ratios(t["plain_range"], t["store_range"])),
        Figure("LocalStore.get_bytes", mib / median(t["store_whole"]), "MiB/s"),
        Figure("open().read()", mib / median(t["plain_whole"]), "MiB/s"),
        Figure.ratio("ratio get_bytes / plain", paired_ratios(t["plain_whole"], t["store_whole"])),
    ])


def s3(store: LocalStore, keys: list[str], size: int, chunk: int, args: argparse.Namespace) -> None:
    from vitscope.s3 import S3Store

    remote = S3Store(args.s3_bucket, f"bench-{uuid.uuid4().hex[:12]}")
    remote.ensure_bucket()
    try:
        for k in keys:
            remote.put_file(k, store.root / k)
        t = interleaved({
            "s3_range": wall(lambda: read_ranges(remote, keys, size, chunk)),
            "local_range": wall(lambda: read_ranges(store, keys, size, chunk)),
            "s3_whole": wall(lambda: read_whole(remote, keys)),
            "local_whole": wall(lambda: read_whole(store, keys)),
        }, args.repeats)
    finally:
        remote.delete_prefix("")
    mib = len(keys) * size / MiB
    report(f"S3 store at {remote.endpoint_url} (report only)", [
        Figure("S3Store.get_range", mib / median(t["s3_range"]), "MiB/s"),
        Figure.ratio("ratio S3 / local get_range", paired_ratios(t["local_range"], t["s3_range"])),
        Figure("S3Store.get_bytes", mib / median(t["s3_whole"]), "MiB/s"),
        Figure.ratio("ratio S3 / local get_bytes", paired_ratios(t["local_whole"], t["s3_whole"])),
    ])


def main() -> None:
    args = parse_args()
    print_environment(args)
    size, chunk = args.file_mib * MiB, args.range_kib * 1024
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory(prefix="vitscope-bench-store-") as name:
        store = LocalStore(Path(name) / "store")
        keys = [f"bench/file-{i:03d}.bin" for i in range(args.files)]
        for k in keys:
            store.put_bytes(k, rng.bytes(size))
        local(store, keys, size, chunk, args)
        if os.environ.get("AWS_ENDPOINT_URL"):
            s3(store, keys, size, chunk, args)
        else:
            print("\nS3: skipped (set AWS_ENDPOINT_URL, e.g. eval \"$(deploy/radosgw.sh start)\")")


if __name__ == "__main__":
    main()
