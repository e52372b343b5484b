"""The .proto contracts, shipped as package data (``vitscope.protos``); :mod:`vitscope.proto`
builds the Python gRPC classes from them at import time.

A regular package (not a namespace one) so that ``importlib.resources.files("vitscope.protos")``
also resolves in an editable install, whose path mapping skips namespace sub-packages.
"""
