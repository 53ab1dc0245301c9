"""trojanprune: remove backdoors from trained image classifiers by pruning the neurons that
carry them."""

__version__ = "0.1.0"

from . import attacks, data, metrics, models  # noqa: E402
from .errors import TrojanPruneError  # noqa: E402

__all__ = ["attacks", "data", "metrics", "models", "TrojanPruneError", "__version__"]
