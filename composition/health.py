"""`vitscope health`: whether the server a container runs answers, for the image's HEALTHCHECK.

One image (Dockerfile.gpu) runs batch jobs and several servers, so one image-level check has to
find out what to check: by default it reads what the container's main process (PID 1) runs and
checks that server on loopback, and it counts a batch job, which serves nothing, as healthy.
It runs every 30 s in every container, so it imports no torch, Prefect or Streamlit: gRPC for
the analyzer, the standard library for the rest.
"""

from __future__ import annotations

import contextlib
import io
import os
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

PID1_CMDLINE = Path("/proc/1/cmdline")


@dataclass
class HealthConfig:
    """Check that the server this container runs is answering: an analyzer, an explorer, a Prefect server or worker.

    Without --target the server is the one the container's main process (PID 1) runs:
    `vitscope serve` (gRPC health), `vitscope explore` (Streamlit's /_stcore/health),
    `prefect server start` (/api/health) or `prefect worker start --with-healthcheck` (/health),
    each on loopback at the port its command line gives. Anything else (a batch job such as
    `vitscope extract`) serves nothing and counts as healthy. Exit status: 0 healthy, 1 not."""

    target: str | None = None
    """grpc://HOST:PORT or grpcs://HOST:PORT (an analyzer's gRPC health service), or an http(s)://
    URL that must answer 200. Default: the server PID 1 runs."""
    timeout: float = 5.0
    """Seconds to wait for the answer."""
    ca: str | None = None
    """PEM file of the certificates that a grpcs:// target is checked against (default: the system's)."""


@dataclass(frozen=True)
class Probe:
    """One check: ``url`` (grpc://, grpcs://, http://, https://) of ``server``, a name for messages."""

    url: str
    server: str
    ca: str | None = None


class Unhealthy(Exception):
    """The server did not answer, or answered that it is not serving."""


def probe_for(cfg: HealthConfig) -> Probe | None:
    """What to check: the configured target, or the server that PID 1 runs (None: no server)."""
    if cfg.target is not None:
        scheme = urlsplit(cfg.target).scheme
        if scheme not in ("grpc", "grpcs", "http", "https"):
            raise ValueError(f"--target {cfg.target!r}: give grpc://HOST:PORT, grpcs://HOST:PORT or an http(s):// URL")
        return Probe(cfg.target, "the server", cfg.ca)
    return probe_of_command(pid1_command(), os.environ)


def pid1_command() -> list[str]:
    """The command line of this PID namespace's first process ([] where it cannot be read)."""
    try:
        raw = PID1_CMDLINE.read_bytes()
    except OSError:
        return []
    return [w.decode(errors="replace") for w in raw.split(b"\0") if w]


def probe_of_command(argv: Sequence[str], env: Mapping[str, str]) -> Probe | None:
    """The check for the server that command line ``argv`` runs, None if it runs no server.

    ``argv`` may start with an init (docker-init, tini) or the interpreter of a console script;
    the program is the first word named ``vitscope`` or ``prefect``. ``env`` supplies Prefect's
    settings, which the container gives every process alike."""
    for i, word in enumerate(argv):
        program = Path(word).name
        if program in ("vitscope", "prefect"):
            args = [a for a in argv[i + 1:] if a != "--debug"]
            return _vitscope_probe(args) if program == "vitscope" else _prefect_probe(args, env)
    return None


def _vitscope_probe(args: list[str]) -> Probe | None:
    if not args or args[0] not in ("serve", "explore"):
        return None
    from vitscope.composition.cli import parse

    try:  # the server's own parser, so its defaults are the ones it listens with
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            cfg = parse(args[0], args[1:])
    except SystemExit:
        raise ValueError(f"cannot read the options of PID 1 (vitscope {' '.join(args)}): give --target") from None
    if cfg.port == 0:
        raise ValueError("PID 1 listens on a port it picks itself (--port 0): give --target")
    if args[0] == "explore":
        return Probe(f"http://{_loopback(cfg.host)}:{cfg.port}/_stcore/health", "the explorer")
    if cfg.tls_cert:
        # The certificate names the server, not 127.0.0.1: check it as localhost, against itself.
        return Probe(f"grpcs://localhost:{cfg.port}", "the analyzer", cfg.tls_cert)
    return Probe(f"grpc://{_loopback(cfg.host)}:{cfg.port}", "the analyzer")


def _prefect_probe(args: list[str], env: Mapping[str, str]) -> Probe | None:
    if args[:2] == ["server", "start"]:
        host = _option(args, "--host") or env.get("PREFECT_SERVER_API_HOST", "127.0.0.1")
        port = _option(args, "--port") or env.get("PREFECT_SERVER_API_PORT", "4200")
        return Probe(f"http://{_loopback(host)}:{port}/api/health", "the Prefect server")
    if args[:2] == ["worker", "start"] and "--with-healthcheck" in args:
        host = env.get("PREFECT_WORKER_WEBSERVER_HOST", "0.0.0.0")
        port = env.get("PREFECT_WORKER_WEBSERVER_PORT", "8080")
        return Probe(f"http://{_loopback(host)}:{port}/health", "the Prefect worker")
    return None


def _option(args: list[str], name: str) -> str | None:
    """The value of ``--name VALUE`` or ``--name=VALUE`` (the last one given)."""
    value = None
    for i, a in enumerate(args):
        if a == name and i + 1 < len(args):
            value = args[i + 1]
        elif a.startswith(name + "="):
            value = a.split("=", 1)[1]
    return value


def _loopback(host: str) -> str:
    """Where a check in the same container reaches a server listening on ``host``."""
    host = host.strip("[]")
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


def check(probe: Probe, timeout: float) -> str:
    """Ask ``probe``'s server whether it serves; returns what it said, raises :class:`Unhealthy`."""
    if probe.url.startswith(("grpc://", "grpcs://")):
        return _check_grpc(probe, timeout)
    # No proxy: a proxy from the environment would answer for a loopback server.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(probe.url, timeout=timeout) as reply:
            return f"HTTP {reply.status}"
    except urllib.error.HTTPError as e:
        raise Unhealthy(f"HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, OSError) as e:
        raise Unhealthy(str(getattr(e, "reason", e))) from None


def _check_grpc(probe: Probe, timeout: float) -> str:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    address = probe.url.split("://", 1)[1].rstrip("/")
    if probe.url.startswith("grpcs://"):
        roots = Path(probe.ca).read_bytes() if probe.ca else None
        channel = grpc.secure_channel(address, grpc.ssl_channel_credentials(root_certificates=roots))
    else:
        channel = grpc.insecure_channel(address)
    with channel:
        try:
            # The empty service name: the server as a whole. Health checks need no token.
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout)
        except grpc.RpcError as e:
            raise Unhealthy(f"{e.code().name}: {' '.join(str(e.details()).split())}") from None
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        raise Unhealthy(status)
    return status
