"""trojanprune: remove backdoors from trained image classifiers by pruning the neurons that
carry them.

    import trojanprune as tp
    result = tp.repair(model, (x, y), method="onp", seed=0)
    tp.defenses.available()
"""

__version__ = "0.1.0"

from . import attacks, data, defenses, metrics, models  # noqa: E402
from .defenses.base import RepairResult  # noqa: E402
from .errors import TrojanPruneError  # noqa: E402
from .repair import repair  # noqa: E402  (the function; the module stays importable by name)

__all__ = ["attacks", "data", "defenses", "metrics", "models", "repair", "RepairResult",
           "TrojanPruneError", "__version__"]
