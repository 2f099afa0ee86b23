"""The code an exported Hugging Face directory runs (`tidar export --hf`), copied there verbatim:
configuration_tidar.py, modeling_tidar.py and generate.py (as custom_generate/generate.py).

It must run where `tidar` is not installed: these files import torch and transformers only, and
one another by relative import, as transformers' remote code loader expects."""
