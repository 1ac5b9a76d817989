"""The package version: one definition, read by pyproject.toml (setuptools' attr), the package and
the kernel cache key (a new version never loads an old version's binaries)."""

__version__ = "0.1.0"
