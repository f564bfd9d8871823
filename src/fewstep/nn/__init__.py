"""Networks only: they know nothing of schedules or samplers.

Every network has the signature ``net(x, t, *, y=None, context=None, context_mask=None, pooled=None)``
and takes the constructor keywords ``image_size``, ``in_channels``, ``num_classes``, ``context_dim``.
"""

from fewstep.nn.dit import DiT
from fewstep.nn.unet import UNet

__all__ = ["DiT", "UNet"]
