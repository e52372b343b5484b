"""What ``vitscope analyze`` and ``vitscope serve`` are asked to do (no gRPC or model code is
imported to read the options)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class AnalyzeConfig:
    """Compute per-latent statistics and top-k images of a trained SAE."""

    sae: str
    """SAE id (printed by `vitscope train`)."""
    store: str = ".vitscope/store"
    """Store holding the SAE and its activation set; results are published there too."""
    top_images: int = 32
    """Top images kept per latent (unique images, each with its best patch)."""
    part: int = 0
    """Which part of the pass this process runs (0-based), when it is split into --parts."""
    parts: int = 1
    """Split the pass into this many contiguous blocks of shards, for separate processes or
    machines: each publishes its partial state, and `vitscope analyze --parts N --finish` merges
    them (running any still missing). The result is identical whatever the number of parts."""
    finish: bool = False
    """Merge the parts' states and publish the analysis."""
    batch_images: int = 256
    """Images encoded at once (bounds memory: batch_images x patches x d_sae floats)."""
    device: str = "auto"
    """Where the SAE encodes: 'auto' (cuda if available), 'cpu', 'cuda', 'cuda:1', ..."""
    progress: bool = True
    """Show a progress bar (images and images/s)."""


@dataclass
class ServeConfig:
    """Serve a store's SAEs, analyses and images over gRPC (the explorer's back end)."""

    store: str = ".vitscope/store"
    """Store holding the SAEs and analyses: a folder path, file:///path or s3://bucket/prefix."""
    host: str = "127.0.0.1"
    """Interface to listen on (0.0.0.0 or [::] for every interface: then a token, or --insecure, is required)."""
    port: int = 50051
    """Port to listen on; 0 picks a free one."""
    token: str | None = None
    """Require 'authorization: Bearer <token>' on every call (health checks exempt). Default: $VITSCOPE_TOKEN if set."""
    tls_cert: str | None = None
    """PEM certificate chain file: serve TLS (needs tls_key too)."""
    tls_key: str | None = None
    """PEM private key file for tls_cert."""
    workers: int = 8
    """Threads answering calls concurrently."""
    max_queued_calls: int = 128
    """Calls that may wait for a free thread; beyond that a call gets RESOURCE_EXHAUSTED at once
    rather than queueing without bound."""
    max_message_mb: int = 16
    """Largest request accepted, in MiB (room for uploaded images); bigger ones get RESOURCE_EXHAUSTED."""
    insecure: bool = False
    """Allow listening on a non-loopback interface without a bearer token, so that anyone who can
    reach the port can read the store. Without this flag, `serve` refuses to start that way."""
