"""The network: config, transformer, KV cache, CPU kernels and weight I/O. Knows no decoder."""
