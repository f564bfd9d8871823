"""Lightning callbacks: sample grids, sampling time and FID (checkpoints and progress bars are Lightning's)."""

from fewstep.callbacks.fid import FID
from fewstep.callbacks.sampling import SampleGrid, SamplingTime

__all__ = ["FID", "SampleGrid", "SamplingTime"]
