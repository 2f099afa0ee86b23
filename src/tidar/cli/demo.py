"""TEMPORARY shim during the restructure: the parser still lives in tidar.demo."""

from tidar.demo import main  # noqa: F401
