"""Train a diffusion model: python train.py [group=option ...] [key=value ...]  (see README)."""

import hydra
from omegaconf import DictConfig

from fewstep.config import cli, exit_on_bad_choices, register_resolvers

register_resolvers()


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
@cli
def main(cfg: DictConfig) -> float | None:
    from fewstep.train import train  # heavy imports after Hydra parsed the command line

    return train(cfg)


if __name__ == "__main__":
    exit_on_bad_choices()
    main()
