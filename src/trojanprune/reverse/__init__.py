"""Reverse engineering from a trained model: triggers, data, and outlier detection.

- :func:`reverse_triggers` (``trigger.py``): a Neural-Cleanse-style mask and pattern for every
  class, all classes in one batched problem, with MAD detection of the backdoor target.
- :func:`reverse_feature_triggers` (``feature.py``): the same idea one layer down, a channel
  mask and values per class at a hidden layer (ours; finds full-image triggers such as WaNet's
  and SIG's, which the pixel-space reverse misses).
- :func:`reverse_warps` (``warp.py``): one small smooth warp of the image plane per class (ours;
  finds warping triggers such as WaNet's, which neither of the above models).
- :func:`synthesize` (``data.py``): DeepInversion-style images per class from the model alone
  (class confidence + BatchNorm statistics + image priors), for data-free defenses.
- :func:`detect_outlier` / :func:`anomaly_index` (``detect.py``): Neural Cleanse's MAD test, and
  (ours) :func:`small_masks`: a mask at most a third of the median class's is flagged too;
  :func:`high_side_outliers` and :func:`unrecognised` (ours): large-mask, clean-label suspects.

Shared by ShapPruning (its first three stages) and ONP (its default backdoor probe).
"""

from .data import SynthesizedData, synthesize
from .detect import (ANOMALY_THRESHOLD, LARGE_MASK_ACCURACY_RATIO, SMALL_MASK_RATIO, Detection, anomaly_index,
                     detect_outlier, high_side_outliers, small_masks, unrecognised)
from .feature import FeatureTriggers, reverse_feature_triggers
from .trigger import ReversedTriggers, reverse_triggers
from .warp import ReversedWarps, reverse_warps

__all__ = ["ANOMALY_THRESHOLD", "Detection", "FeatureTriggers", "LARGE_MASK_ACCURACY_RATIO",
           "ReversedTriggers", "ReversedWarps", "SMALL_MASK_RATIO", "SynthesizedData", "anomaly_index",
           "detect_outlier", "high_side_outliers", "reverse_feature_triggers", "reverse_triggers", "reverse_warps",
           "small_masks", "synthesize", "unrecognised"]
