"""TEMPORARY shim during the restructure: the parser still lives in tidar.measure.plots."""

from tidar.measure.plots import main  # noqa: F401
