"""Hugging Face interop: a TiDAR model as a transformers model directory that
`AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)` opens, with TiDAR decoding
through transformers' `custom_generate` (`tidar export --hf`; `tidar.hf.export.export_hf`).

Nothing is imported here, so the CLI can name `tidar.hf.errors` without loading torch."""
