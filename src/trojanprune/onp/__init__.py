"""ONP's building blocks (Li, Yu, Yi, arXiv 2405.17746); the defense itself is
:mod:`trojanprune.defenses.onp` (``trojanprune.repair(model, clean, method="onp")``).

- :mod:`.graphs`: one graph per prunable unit group (nodes = channels, cosine-similarity edges,
  node features);
- :mod:`.probes`: pluggable trigger-free backdoor probes (reversed trigger, ANP, unlearning);
- :mod:`.agent`: the GNN encoder and the PPO actor-critic.

Each module's docstring says which parts the paper confirms and which are our design.
"""

from .agent import ActorCritic, PPOConfig, train_ppo
from .graphs import GraphBuildError, NetworkGraphs, build_graphs
from .probes import Probe, available_probes, create_probe, register_probe

__all__ = ["ActorCritic", "GraphBuildError", "NetworkGraphs", "PPOConfig", "Probe",
           "available_probes", "build_graphs", "create_probe", "register_probe", "train_ppo"]
