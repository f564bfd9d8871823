"""fewstep: train image diffusion models with Lightning + Hydra, and sample them in few steps."""

__version__ = "0.1.0"
