"""Measurement: the side-by-side benchmark, latency profiles, HumanEval/perplexity and plots."""
