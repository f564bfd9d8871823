"""Image editing and inpainting on the contract (a denoiser, a grid of noise levels, a sampler).

- :func:`sdedit`: noise the input part of the way and sample back (Meng et al. 2022);
- :func:`invert`: the probability-flow ODE from the image to noise (DDIM inversion and its
  higher-order versions); :func:`edit`: invert with one condition, regenerate with another;
- :func:`inpaint`: fill masked pixels, ``method="replace" | "repaint" | "ddnm"``.

They work with any denoiser (``denoiser(x, sigma[batch], **cond) -> x0_hat``) and any sampler.
"""

from fewstep.tasks.editing import INVERTIBLE, edit, invert, sdedit, start_index
from fewstep.tasks.inpainting import METHODS, check_mask, inpaint, resampled
from fewstep.tasks.masks import MASKS, load_mask, make_masks

__all__ = [
    "INVERTIBLE",
    "MASKS",
    "METHODS",
    "check_mask",
    "edit",
    "inpaint",
    "invert",
    "load_mask",
    "make_masks",
    "resampled",
    "sdedit",
    "start_index",
]
