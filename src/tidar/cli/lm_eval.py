"""TEMPORARY shim during the restructure: the parser still lives in tidar.serve.lm_eval."""

from tidar.serve.lm_eval import main  # noqa: F401
