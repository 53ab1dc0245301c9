"""ONP on the test suite's MNIST BadNets fixture (:func:`trojanprune.testing.mnist_badnets_case`),
several seeds.

    TROJANPRUNE_DATA=../shared/datasets OMP_NUM_THREADS=1 python benchmarks/onp_fixture_seeds.py 0 1 2 3 \
        [--set suspect_weights=anomaly ...]

The same model and settings as tests/test_onp.py::onp_run (128 episodes, shorter reverses): per
seed, the reward gain of the second half of the PPO batches over the first, the true ASR and ACC
after the repair, and the suspects. Output of the stop-14 run: benchmarks/results/onp-probes/fixture-seeds.txt.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("TROJANPRUNE_CACHE", "/tmp/trojanprune-fixture-cache")

import trojanprune as tp  # noqa: E402
from trojanprune import metrics  # noqa: E402
from trojanprune.testing import ONP_FIXTURE_OPTIONS, mnist_badnets_case  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("seeds", nargs="+", type=int)
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="ONP options on top of the test suite's (strings, as the CLI's --set)")
    args = ap.parse_args()
    extra = dict(item.split("=", 1) for item in args.set)
    case = mnist_badnets_case(os.environ.get("TROJANPRUNE_DATA", "../shared/datasets"))
    for seed in args.seeds:
        r = tp.repair(case.model, case.clean, method="onp", seed=seed, **{**ONP_FIXTURE_OPTIONS, **extra})
        curve = r.details["reward_curve"]
        after = metrics.evaluate(r.model, case.test, case.attack)
        suspects = [(s["space"][0], s["class"], s.get("layer", ""), s["weight"])
                    for s in r.details["probe"]["suspects"]]
        print(seed, "gain %.3f" % (sum(curve[4:]) / 4 - sum(curve[:4]) / 4),
              "asr %.2f acc %.2f" % (after["asr"], after["acc"]), suspects, flush=True)


if __name__ == "__main__":
    main()
