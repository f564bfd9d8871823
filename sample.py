"""Sample a trained checkpoint: python sample.py ckpt=PATH sampler=ddim sampler.steps=50 n=64 out_dir=DIR."""

import hydra
from omegaconf import DictConfig

from fewstep.config import cli, exit_on_bad_choices, register_resolvers

register_resolvers()


@hydra.main(version_base="1.3", config_path="conf", config_name="sample")
@cli
def main(cfg: DictConfig) -> dict:
    from fewstep.sample import sample

    return sample(cfg)


if __name__ == "__main__":
    exit_on_bad_choices()
    main()
