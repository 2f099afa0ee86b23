"""Serving: the OpenAI-compatible HTTP server and the lm-evaluation-harness adapter."""
