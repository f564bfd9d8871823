"""Lightning callbacks: sample grids and sampling time (checkpoints and progress bars are Lightning's)."""

from fewstep.callbacks.sampling import SampleGrid, SamplingTime

__all__ = ["SampleGrid", "SamplingTime"]
