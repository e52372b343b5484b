"""vitscope: look inside vision transformers with sparse autoencoders."""

__version__ = "0.1.0"
