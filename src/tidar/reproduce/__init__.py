"""The paper's claims at laptop scale (`make reproduce`): train a small tokenizer and model, pretrain
AR, continue it as AR, TiDAR and block diffusion on equal tokens, and measure all of them with the
real engine. See docs/reproduction.md."""
