"""Configs that ship inside the package (the sampler group): found by Hydra through pkg://fewstep.conf."""
