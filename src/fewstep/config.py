"""Hydra glue shared by train.py and sample.py: resolvers, choice checks, one-line errors."""

from __future__ import annotations

import netrc
import os
import sys
from collections.abc import Callable, Sequence
from functools import wraps
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

CONFIG_DIR = Path(__file__).resolve().parents[2] / "conf"
# Groups that ship inside the package (an installed fewstep finds them without the source tree).
PACKAGE_CONFIG_DIR = Path(__file__).resolve().parent / "conf"
# Errors that mean "the input is wrong": shown as one line, not a traceback (FEWSTEP_DEBUG=1 shows it).
USER_ERRORS = (ValueError, FileNotFoundError, FloatingPointError)


def wandb_offline() -> bool:
    """W&B runs offline unless the user configured it: WANDB_MODE, WANDB_API_KEY or a `wandb login`."""
    mode = os.environ.get("WANDB_MODE")
    if mode:
        return mode in ("offline", "dryrun", "disabled")
    if os.environ.get("WANDB_API_KEY"):
        return False
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return True


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("fewstep_wandb_offline"):
        OmegaConf.register_new_resolver("fewstep_wandb_offline", wandb_offline)
    if not OmegaConf.has_resolver("fewstep_cwd"):
        # paths.root_dir: ${hydra:runtime.cwd} is not set yet when a multirun resolves hydra.sweep.dir
        OmegaConf.register_new_resolver("fewstep_cwd", os.getcwd)
    if not OmegaConf.has_resolver("fewstep_mul"):  # e.g. max_steps = rounds x steps per round
        OmegaConf.register_new_resolver("fewstep_mul", lambda a, b: int(a) * int(b))


def group_options(group: str, config_dir: Path = CONFIG_DIR) -> list[str]:
    dirs = (config_dir / group, PACKAGE_CONFIG_DIR / group)
    return sorted({p.stem for d in dirs for p in d.glob("*.yaml")})


def sampler_config(name: str) -> dict[str, Any]:
    """The packaged ``sampler/NAME.yaml`` as a dict (the defaults a sampler is used with), or just the name.

    Read from the installed package, never from the source tree's ``conf/``.
    """
    path = PACKAGE_CONFIG_DIR / "sampler" / f"{name}.yaml"
    return dict(OmegaConf.to_container(OmegaConf.load(path))) if path.is_file() else {"name": name}


def check_choices(argv: Sequence[str], config_dir: Path = CONFIG_DIR) -> str | None:
    """The one-line error for a command-line ``group=option`` naming no config, else None.

    Hydra would also refuse it, with a multi-line report; this says it in one line, first.
    """
    for arg in argv:
        if "=" not in arg or arg.startswith(("-", "+", "~", "hydra")):
            continue
        key, value = arg.split("=", 1)
        if "." in key or "/" in key or not ((config_dir / key).is_dir() or (PACKAGE_CONFIG_DIR / key).is_dir()):
            continue
        options = group_options(key, config_dir)
        for choice in value.split(","):  # multirun: sampler=ddim,ddpm
            if choice not in options and choice != "null":
                return f"unknown {key} {choice!r}; choose one of: {', '.join(options)} (e.g. {key}={options[0]})"
    return None


def cli(main: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a Hydra task: check group choices first, and report bad input as one line."""

    @wraps(main)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return main(*args, **kwargs)
        except USER_ERRORS as err:
            if os.environ.get("FEWSTEP_DEBUG"):
                raise
            message = " ".join(str(err).split()) or type(err).__name__
            print(f"\nerror: {message}", file=sys.stderr)  # newline: a progress bar may own the line
            sys.exit(1)

    return wrapper


def exit_on_bad_choices(argv: Sequence[str] | None = None) -> None:
    problem = check_choices(sys.argv[1:] if argv is None else argv)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        sys.exit(2)
