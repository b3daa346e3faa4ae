"""Active indexing: change images imperceptibly before release so that their descriptors sit deep
inside their index cells (Fernandez et al., ICLR 2023; METHOD.md §1).

- :mod:`.jnd` the perceptual heatmap that shapes the perturbation;
- :mod:`.resize` the exact, differentiable, batched (banded) resize to the extractor input;
- :mod:`.render` the budgeted perturbation and the rendered image, forward and backward in tiles;
- :mod:`.targets` what the index can give as a target, and which indexes can;
- :mod:`.optimize` the optimisation over a batch (:func:`activate_batch`, :class:`ActivationConfig`);
- :mod:`.release` encoding the released file within the PSNR budget;
- :mod:`.add` ``add --activate``: activate, write the released files, add the originals' codes,
  crash-safe and resumable.
"""

from activeindex.activation.optimize import ActivatedBatch, ActivationConfig, FeatureLoss, activate_batch
from activeindex.activation.release import OutputFormat
from activeindex.activation.targets import TargetKind, check_target_support, compute_targets

__all__ = [
    "ActivatedBatch",
    "ActivationConfig",
    "FeatureLoss",
    "OutputFormat",
    "TargetKind",
    "activate_batch",
    "check_target_support",
    "compute_targets",
]
