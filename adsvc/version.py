"""The adsvc release (the package, the server and the CLI report it)."""

__version__ = "0.1.0"
