"""The analyzer's gRPC contract (``proto/vitscope/v2/analyzer.proto``) in Python: the generated,
typed message and service modules, and the resource names its requests and replies carry.

The modules ``vitscope.v2.analyzer_pb2`` (with a ``.pyi`` stub) and ``analyzer_pb2_grpc`` are
generated at build time (``setup.py``) and never committed; importing this module checks that
they match the .proto and regenerates them when not (:mod:`vitscope.protos.generate`). Servers
and clients alike use::

    from vitscope.proto import names, pb, rpc

    stub = rpc.AnalyzerStub(grpc.insecure_channel("127.0.0.1:50051"))
    sae = stub.GetSae(pb.GetSaeRequest(name=names.sae("0123abcd")))
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import vitscope
from vitscope.protos import generate


def _generated_root() -> Path:
    """A folder holding current ``vitscope/v2/*_pb2*`` modules: the package's own (generated at
    build time, or now if it is writable and stale), else a per-user cache folder."""
    here = Path(vitscope.__file__).resolve().parent.parent
    if generate.is_current(here):
        return here
    try:
        generate.generate(here)
        return here
    except OSError:  # an installed package the user cannot write to
        pass
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "vitscope" / "protos"
    out = cache / generate.fingerprint()[:16]
    if not generate.is_current(out):
        generate.generate(out)
    # First on the path, so that the fresh modules win over stale ones in the package.
    vitscope.__path__.insert(0, str(out / "vitscope"))
    return out


_generated_root()

from vitscope.v2 import analyzer_pb2 as pb  # noqa: E402  (generated just above when missing)
from vitscope.v2 import analyzer_pb2_grpc as rpc  # noqa: E402

__all__ = ["SERVICE", "ResourceNameError", "names", "pb", "rpc"]

SERVICE = pb.DESCRIPTOR.services_by_name["Analyzer"].full_name
"""``vitscope.v2.Analyzer``: the service's full name (health checks, reflection)."""


class ResourceNameError(ValueError):
    """A resource name that does not have the form its field asks for."""


MAX_ID_LENGTH = 128
_ID = rf"[A-Za-z0-9][A-Za-z0-9._-]{{0,{MAX_ID_LENGTH - 1}}}"
_INDEX = r"0|[1-9][0-9]{0,17}"  # decimal, no sign or leading zeros: one spelling per resource


class names:
    """Format and parse the API's resource names (see the .proto's header)::

        names.sae("abc")            -> "saes/abc"
        names.latent("abc", 7)      -> "saes/abc/latents/7"
        names.label("abc", 7)       -> "saes/abc/latents/7/label"
        names.image("set1", 3)      -> "activationSets/set1/images/3"
        names.parse_latent("saes/abc/latents/7") -> ("abc", 7)

    Parsing raises :class:`ResourceNameError` with a message fit for the caller."""

    _PATTERNS = {
        "sae": re.compile(rf"saes/({_ID})"),
        "latent": re.compile(rf"saes/({_ID})/latents/({_INDEX})"),
        "label": re.compile(rf"saes/({_ID})/latents/({_INDEX})/label"),
        "evaluation": re.compile(rf"saes/({_ID})/evaluation"),
        "activation_set": re.compile(rf"activationSets/({_ID})"),
        "image": re.compile(rf"activationSets/({_ID})/images/({_INDEX})"),
        "analysis": re.compile(rf"analyses/({_ID})"),
    }
    _FORMS = {"sae": "saes/{sae}", "latent": "saes/{sae}/latents/{latent}", "activation_set": "activationSets/{set}",
              "label": "saes/{sae}/latents/{latent}/label", "evaluation": "saes/{sae}/evaluation",
              "image": "activationSets/{set}/images/{image}", "analysis": "analyses/{analysis}"}

    @staticmethod
    def sae(sae_id: str) -> str:
        return f"saes/{sae_id}"

    @staticmethod
    def latent(sae_id: str, index: int) -> str:
        return f"saes/{sae_id}/latents/{index}"

    @staticmethod
    def label(sae_id: str, index: int) -> str:
        return f"saes/{sae_id}/latents/{index}/label"

    @staticmethod
    def evaluation(sae_id: str) -> str:
        return f"saes/{sae_id}/evaluation"

    @staticmethod
    def activation_set(set_id: str) -> str:
        return f"activationSets/{set_id}"

    @staticmethod
    def image(set_id: str, index: int) -> str:
        return f"activationSets/{set_id}/images/{index}"

    @staticmethod
    def analysis(analysis_id: str) -> str:
        return f"analyses/{analysis_id}"

    @classmethod
    def _parse(cls, kind: str, name: str, field: str) -> tuple[str, ...]:
        if not name:
            raise ResourceNameError(f"{field} is required (a name of the form {cls._FORMS[kind]})")
        match = cls._PATTERNS[kind].fullmatch(name)
        if match is None:
            shown = repr(name) if len(name) <= 60 else f"{name[:60]!r}... ({len(name)} characters)"
            raise ResourceNameError(
                f"malformed {field} {shown}: expected {cls._FORMS[kind]}, where ids are up to {MAX_ID_LENGTH} "
                "letters, digits, '.', '_' and '-' starting with a letter or digit, and indices decimal integers")
        return match.groups()

    @classmethod
    def parse_sae(cls, name: str, field: str = "name") -> str:
        """The SAE id of ``saes/{sae}``."""
        return cls._parse("sae", name, field)[0]

    @classmethod
    def parse_latent(cls, name: str, field: str = "name") -> tuple[str, int]:
        """(SAE id, latent index) of ``saes/{sae}/latents/{latent}``."""
        sae_id, index = cls._parse("latent", name, field)
        return sae_id, int(index)

    @classmethod
    def parse_label(cls, name: str, field: str = "name") -> tuple[str, int]:
        """(SAE id, latent index) of ``saes/{sae}/latents/{latent}/label``."""
        sae_id, index = cls._parse("label", name, field)
        return sae_id, int(index)

    @classmethod
    def parse_evaluation(cls, name: str, field: str = "name") -> str:
        """The SAE id of ``saes/{sae}/evaluation``."""
        return cls._parse("evaluation", name, field)[0]

    @classmethod
    def parse_image(cls, name: str, field: str = "image") -> tuple[str, int]:
        """(activation set id, image index) of ``activationSets/{set}/images/{image}``."""
        set_id, index = cls._parse("image", name, field)
        return set_id, int(index)

    @classmethod
    def parse_activation_set(cls, name: str, field: str = "activation_set") -> str:
        """The set id of ``activationSets/{set}``."""
        return cls._parse("activation_set", name, field)[0]

    @classmethod
    def parse_analysis(cls, name: str, field: str = "analysis") -> str:
        """The analysis id of ``analyses/{analysis}``."""
        return cls._parse("analysis", name, field)[0]
