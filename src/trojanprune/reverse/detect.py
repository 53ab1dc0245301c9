"""Outlier detection over per-class trigger sizes: Neural Cleanse's MAD anomaly index.

Wang et al., "Neural Cleanse: Identifying and Mitigating Backdoor Attacks in Neural Networks",
IEEE S&P 2019, Sec. IV: the anomaly index of class k is ``|n_k - median(n)| / (1.4826 *
MAD(n))`` over the L1 norms ``n`` of the reversed masks (1.4826 makes the MAD a consistent
estimator of the standard deviation for normal data). A class whose norm is *below* the median
with an index above 2 (more than ~95% confidence of being an outlier) is flagged: a backdoor
target needs a much smaller trigger than the other classes. Large norms are never flagged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import ConfigError

#: Neural Cleanse's threshold on the anomaly index.
ANOMALY_THRESHOLD = 2.0
#: consistency constant that turns a MAD into a standard-deviation estimate (normal data)
MAD_CONSISTENCY = 1.4826


def anomaly_index(norms: torch.Tensor) -> torch.Tensor:
    """(K,) anomaly index of each value, positive on both sides of the median.

    When the MAD is 0 (at least half of the values are equal) a tiny floor is used, so values
    equal to the median get index 0 and any other value a very large index.
    """
    norms = torch.as_tensor(norms, dtype=torch.float64).flatten()
    if norms.numel() < 2:
        raise ConfigError("the anomaly index needs at least 2 values (classes)")
    median = norms.median()
    mad = MAD_CONSISTENCY * (norms - median).abs().median()
    floor = 1e-12 * max(1.0, float(norms.abs().max()))
    return ((norms - median).abs() / mad.clamp_min(floor)).float()


@dataclass
class Detection:
    """Which classes are low-side outliers, and the one reported as the target."""

    anomaly_index: torch.Tensor   # (K,)
    flagged: list[int]            # classes with norm < median and index > threshold
    target: int | None            # the flagged class with the smallest norm, or None
    threshold: float

    @property
    def verdict(self) -> str:
        return "backdoor detected" if self.target is not None else "no backdoor detected"


def _outliers(norms: torch.Tensor, threshold: float, side: str) -> tuple[torch.Tensor, list[int]]:
    """(anomaly index, classes whose norm is on ``side`` ("low"/"high") of the median with an
    index > ``threshold``)."""
    if not threshold > 0:
        raise ConfigError(f"the anomaly threshold must be positive, got {threshold}")
    norms = torch.as_tensor(norms, dtype=torch.float64).flatten()
    index = anomaly_index(norms)
    median = norms.median()
    beyond = norms < median if side == "low" else norms > median
    return index, [k for k in range(len(norms)) if bool(beyond[k]) and float(index[k]) > threshold]


def detect_outlier(norms: torch.Tensor, threshold: float = ANOMALY_THRESHOLD) -> Detection:
    """Flag the classes whose norm is a low-side MAD outlier (index > ``threshold``)."""
    index, flagged = _outliers(norms, threshold, "low")
    norms = torch.as_tensor(norms, dtype=torch.float64).flatten()
    target = min(flagged, key=lambda k: float(norms[k])) if flagged else None
    return Detection(index, flagged, target, float(threshold))


def high_side_outliers(norms: torch.Tensor, threshold: float = ANOMALY_THRESHOLD) -> list[int]:
    """The classes whose norm is ABOVE the median with an anomaly index > ``threshold``.

    Not part of Neural Cleanse's test (which never flags large norms) and never reported as a
    detection; ONP's ``suspects`` probe uses it as a source of suspects (see
    :class:`trojanprune.onp.probes.SuspectsProbe` for why).
    """
    return _outliers(norms, threshold, "high")[1]


__all__ = ["ANOMALY_THRESHOLD", "Detection", "anomaly_index", "detect_outlier", "high_side_outliers"]
