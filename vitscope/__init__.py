"""vitscope: look inside vision transformers with sparse autoencoders.

The notebook API (see docs/python-api.md)::

    import vitscope
    sae = vitscope.load_sae("s3://bucket/prefix/saes/<sae_id>")       # with sae.record
    vit = vitscope.load_vit(sae.record.model_spec())                   # the ViT it reads
    latents = sae.encode(vit.activations(image, sae.record.layer)[sae.record.layer])

and ``vitscope.open_activations("<store>/activations/<set_id>")`` to iterate a stored set with
each token's provenance; ``vitscope.intervene`` steers latents inside the ViT (docs/evaluation.md).
The names load lazily: ``import vitscope`` imports no torch.
"""

from vitscope.lazy import lazy_exports

__version__ = "0.3.0"

_EXPORTS = {
    ".activations": ("open_activations",),
    ".models": ("ModelSpec", "load_vit"),
    ".sae": ("load_sae",),
    ".splice": ("Splice", "intervene"),
}
__getattr__, __all__ = lazy_exports(__name__, _EXPORTS)
