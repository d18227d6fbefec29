"""Metrics for generators (diffusion teachers and their few-step students), pure
functions of sample arrays with no model code: ``stages.diffusion.evaluate`` draws the
samples and calls them.

- ``distances``: sliced Wasserstein, unbiased RBF MMD^2, Frechet distance, paired error,
  and the real-data holdout that gives each metric its floor;
- ``toy_modes``: mode geometry of the 2-D toys and mode coverage (high-quality rate,
  modes covered, normalised mode entropy);
- ``digits_features``: a small digits classifier as the Frechet feature space
  (torchmetrics' FID with a custom module) and class coverage of generated digits;
- ``plots``: PNG image grids and 2-D scatter grids (Pillow);
- ``timing``: seconds per 1k samples.
"""

from stages.diffusion.metrics.distances import (
    frechet_between,
    frechet_distance,
    gaussian_stats,
    holdout_split,
    mmd2,
    mmd_bandwidths,
    paired_error,
    sliced_wasserstein,
)
from stages.diffusion.metrics.timing import seconds_per_1k
from stages.diffusion.metrics.toy_modes import mode_coverage, normalised_entropy, toy_modes

__all__ = [
    "frechet_between",
    "frechet_distance",
    "gaussian_stats",
    "holdout_split",
    "mmd2",
    "mmd_bandwidths",
    "mode_coverage",
    "normalised_entropy",
    "paired_error",
    "seconds_per_1k",
    "sliced_wasserstein",
    "toy_modes",
]
