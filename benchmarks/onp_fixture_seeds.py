"""ONP on the test suite's MNIST BadNets fixture (tests/conftest.py backdoor_case), several seeds.

    TROJANPRUNE_DATA=../shared/datasets OMP_NUM_THREADS=1 python benchmarks/onp_fixture_seeds.py 0 1 2 3

The same model and settings as tests/test_onp.py::onp_run (128 episodes, shorter reverses): per
seed, the reward gain of the second half of the PPO batches over the first, the true ASR and ACC
after the repair, and the suspects. Output of the stop-14 run: benchmarks/results/onp-probes/fixture-seeds.txt.
"""
import os, sys, torch
os.environ.setdefault("TROJANPRUNE_CACHE", "/tmp/trojanprune-fixture-cache")
import trojanprune as tp
from trojanprune import attacks, data, metrics, models
from trojanprune.training import TrainConfig, train
from trojanprune.utils import derive_seed
d = os.environ.get("TROJANPRUNE_DATA", "../shared/datasets")
full = data.load_dataset("mnist", "train", data_dir=d)
order = torch.randperm(len(full), generator=torch.Generator().manual_seed(derive_seed(0, "t")))
train_set = full.subset(order[:10000])
clean = data.clean_subset(full.subset(order[10000:20000]), n=500, seed=0)
test = data.load_dataset("mnist", "test", data_dir=d).subset(range(0, 10000, 5))
attack = attacks.create("badnets", train_set.image_shape, 10, target=0, seed=0)
poisoned, _ = attack.poison(train_set, rate=0.1, seed=1)
torch.manual_seed(0)
model = models.create("vgg_small", 10, 1, dataset="mnist", widths=((16, 16), (32, 32), (64, 64)))
train(model, poisoned, TrainConfig(epochs=2, lr=0.05, seed=0, channels_last=False), progress=False)
model.eval()
FAST = dict(reverse_steps=150, reverse_batch_size=8, feature_steps=150, feature_per_class=5)
for seed in map(int, sys.argv[1:]):
    r = tp.repair(model, clean, method="onp", seed=seed, episodes=128, **FAST)
    c = r.details["reward_curve"]
    after = metrics.evaluate(r.model, test, attack)
    print(seed, "gain %.3f" % (sum(c[4:]) / 4 - sum(c[:4]) / 4), "asr %.2f acc %.2f" % (after["asr"], after["acc"]),
          [(s["space"][0], s["class"], s.get("layer", "")) for s in r.details["probe"]["suspects"]], flush=True)
