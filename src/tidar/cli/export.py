"""TEMPORARY shim during the restructure: the parser still lives in tidar.train.export."""

from tidar.train.export import main  # noqa: F401
