"""TEMPORARY shim during the restructure: the parser still lives in tidar.train.data."""

from tidar.train.data import main  # noqa: F401
