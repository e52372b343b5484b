"""The .proto contracts, shipped as package data (``vitscope.protos``), and the generator of
their Python modules (:mod:`vitscope.protos.generate`), used at build time and by
:mod:`vitscope.proto` on import.

A regular package (not a namespace one) so that it also resolves in an editable install, whose
path mapping skips namespace sub-packages.
"""
