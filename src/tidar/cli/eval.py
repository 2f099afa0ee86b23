"""TEMPORARY shim during the restructure: the parser still lives in tidar.measure.evaluate."""

from tidar.measure.evaluate import main  # noqa: F401
