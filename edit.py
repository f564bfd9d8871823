"""Edit images with a trained checkpoint: python edit.py ckpt=PATH task=inpaint|sdedit|invert|edit (conf/edit.yaml)."""

import hydra
from omegaconf import DictConfig

from fewstep.config import cli, exit_on_bad_choices, register_resolvers

register_resolvers()


@hydra.main(version_base="1.3", config_path="conf", config_name="edit")
@cli
def main(cfg: DictConfig) -> dict:
    from fewstep.edit import run_task

    return run_task(cfg)


if __name__ == "__main__":
    exit_on_bad_choices()
    main()
