"""Generates the Python gRPC modules and their typed stubs (``.pyi``) from the .proto files.

Run at build time (``setup.py``'s ``build_py``, for wheels and editable installs alike) and
checked again whenever :mod:`vitscope.proto` is imported: a fingerprint of the .proto files and
the generator's version sits beside the generated modules, and a mismatch (an edited .proto, an
upgraded grpcio-tools) regenerates them. Nothing generated is committed, so the classes cannot
drift from the contract.

This module imports nothing from vitscope, so ``setup.py`` can load it by path before the
package is installed.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from importlib import metadata
from pathlib import Path

PROTO_FILES = ("vitscope/v2/analyzer.proto",)
"""Relative to the proto root; the path is also the generated modules' import path."""

FINGERPRINT = "FINGERPRINT"
"""The file, beside the generated modules, that says what they were generated from."""


def proto_root() -> Path:
    """The folder the .proto files are laid out under: this file's own folder, which is the
    repository's ``proto/`` in a checkout and ``vitscope/protos/`` in an installed package."""
    return Path(__file__).resolve().parent


def fingerprint(root: Path | None = None) -> str:
    """A hash of every .proto file's contents and of the generator's and runtime's versions."""
    root = root or proto_root()
    h = hashlib.sha256()
    for name in ("grpcio-tools", "protobuf"):
        h.update(f"{name}=={metadata.version(name)}\n".encode())
    for rel in PROTO_FILES:
        h.update(rel.encode() + b"\0" + (root / rel).read_bytes() + b"\0")
    return h.hexdigest()


def outputs(rel: str) -> tuple[str, ...]:
    """The files protoc writes for one .proto, relative to the output folder."""
    stem = rel.removesuffix(".proto")
    return f"{stem}_pb2.py", f"{stem}_pb2.pyi", f"{stem}_pb2_grpc.py"


def is_current(out_dir: Path, root: Path | None = None) -> bool:
    """Whether ``out_dir`` holds modules generated from the current .proto files."""
    stamp = out_dir / Path(PROTO_FILES[0]).parent / FINGERPRINT
    try:
        current = stamp.read_text().strip() == fingerprint(root)
    except OSError:
        return False
    return current and all((out_dir / f).is_file() for rel in PROTO_FILES for f in outputs(rel))


def generate(out_dir: Path, root: Path | None = None) -> None:
    """Write the ``_pb2.py``, ``_pb2.pyi`` and ``_pb2_grpc.py`` of every .proto under ``out_dir``
    (e.g. ``out_dir/vitscope/v2/analyzer_pb2.py``), then the fingerprint.

    Each file is written to a temporary folder and moved into place, the fingerprint last, so
    that processes importing at the same time see either the old modules or the new ones."""
    from grpc_tools import protoc  # only needed when generating

    root = root or proto_root()
    out_dir.mkdir(parents=True, exist_ok=True)
    include = Path(protoc.__file__).parent / "_proto"  # google/protobuf/*.proto
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".protoc-") as tmp:
        for rel in PROTO_FILES:
            args = ["protoc", f"-I{root}", f"-I{include}", f"--python_out={tmp}", f"--pyi_out={tmp}",
                    f"--grpc_python_out={tmp}", str(root / rel)]
            if protoc.main(args) != 0:
                raise RuntimeError(f"protoc failed on {root / rel}")
        for rel in PROTO_FILES:
            for f in outputs(rel):
                (out_dir / f).parent.mkdir(parents=True, exist_ok=True)
                os.replace(Path(tmp) / f, out_dir / f)
        stamp = Path(tmp) / FINGERPRINT
        stamp.write_text(fingerprint(root) + "\n")
        os.replace(stamp, out_dir / Path(PROTO_FILES[0]).parent / FINGERPRINT)
