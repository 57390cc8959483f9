"""The ``gpuload`` command: ``inspect``, ``plan``, ``demo``,
``doctor`` and ``bench`` (``gpuload --help``)."""

from gpuload.cli.main import main

__all__ = ["main"]
