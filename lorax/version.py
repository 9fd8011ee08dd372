"""The version of lorax, recorded in checkpoint metadata."""

__version__ = "0.1.0"
