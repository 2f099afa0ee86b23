"""TiDAR: think in diffusion, talk in autoregression."""

__version__ = "0.1.0"
