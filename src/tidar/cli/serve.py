"""TEMPORARY shim during the restructure: the parser still lives in tidar.serve.server."""

from tidar.serve.server import main  # noqa: F401
