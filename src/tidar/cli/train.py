"""TEMPORARY shim during the restructure: the parser still lives in tidar.train.trainer."""

from tidar.train.trainer import main  # noqa: F401
