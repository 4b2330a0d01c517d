"""spiral: a distributed implementation of SPIRAL (Ganin et al. 2018)."""

from importlib.metadata import PackageNotFoundError, version as _distribution_version

try:
    __version__: str = _distribution_version("spiral")
    """The installed distribution's version (``pyproject.toml``'s ``project.version``)."""
except PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0+unknown"
