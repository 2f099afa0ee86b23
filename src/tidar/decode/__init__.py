"""The decoding engine: options, per-batch state, the step, acceptance rules and the draft sources."""
