"""The composition layer: the ``vitscope`` command and the Prefect flows.

This is the only package that puts the stages together. It imports each stage's public
``__init__`` (config, run function, result) and nothing below it; the shared package
(:mod:`vitscope`) and the stages never import it.
"""
