"""TEMPORARY shim during the restructure: the parser still lives in tidar.measure.bench."""

from tidar.measure.bench import main  # noqa: F401
