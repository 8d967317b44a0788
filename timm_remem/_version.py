"""The package version, in a leaf module so every room can stamp it without importing the package root."""

__version__ = "0.1.0"
