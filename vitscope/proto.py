"""Python classes for the gRPC contract in ``proto/``, built from the .proto files at import time.

Nothing generated is committed: the contract is compiled in-process by grpcio-tools the first
time this module is imported (a few tens of milliseconds), so the classes can never drift from
the .proto they come from. Servers and clients alike use::

    from vitscope.proto import pb, rpc

    stub = rpc.AnalyzerStub(grpc.insecure_channel("127.0.0.1:50051"))
    sae = stub.GetSae(pb.GetSaeRequest(sae_id="0123abcd"))
"""

from __future__ import annotations

import sys
from importlib.resources import files
from pathlib import Path
from types import ModuleType

import grpc

import vitscope

PROTO_FILE = "vitscope/v1/analyzer.proto"


def proto_root() -> Path:
    """The folder the .proto files are laid out under (``proto/`` in a source checkout)."""
    return Path(str(files("vitscope.protos")))


def _build() -> tuple[ModuleType, ModuleType]:
    root = proto_root()
    # protoc resolves imports against sys.path, and grpc's importer finds the .proto there.
    if str(root) not in sys.path:
        sys.path.append(str(root))
    # The generated modules are named after the proto package, vitscope.v1.*, which falls
    # inside this Python package: let the import system find vitscope.v1 in the proto tree.
    if str(root / "vitscope") not in vitscope.__path__:
        vitscope.__path__.append(str(root / "vitscope"))
    return grpc.protos_and_services(PROTO_FILE)


pb, rpc = _build()
"""``pb``: the messages (``pb.Sae``, ``pb.GetLatentRequest``, ...); ``rpc``: the service
(``rpc.AnalyzerStub``, ``rpc.AnalyzerServicer``, ``rpc.add_AnalyzerServicer_to_server``)."""
