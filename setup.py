"""Build hook: generates the gRPC modules and typed stubs from proto/ (everything else about
the package is in pyproject.toml)."""

import importlib.util
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent


def _generator():
    # By path: vitscope is not importable while it is being built.
    spec = importlib.util.spec_from_file_location("vitscope_protos_generate", HERE / "proto" / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class BuildPyWithProtos(build_py):
    """``build_py`` that also writes vitscope/v2/*_pb2.py, *_pb2.pyi and *_pb2_grpc.py: into the
    wheel, or into the source tree for an editable install."""

    def run(self):
        super().run()
        out = HERE if self.editable_mode else Path(self.build_lib)
        _generator().generate(out, HERE / "proto")


setup(cmdclass={"build_py": BuildPyWithProtos})
