"""The package version: what convert writes into a model card and `--version` prints."""

__version__ = "0.1.0"
