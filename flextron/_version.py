"""The package version (one place: the package, its build info and its model cards read it)."""

__version__ = "0.1.0"
