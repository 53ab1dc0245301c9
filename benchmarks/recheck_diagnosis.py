"""A diagnosis behind ShapPruning's ``recheck`` (stop 35): after a repair with the recheck off,
is the target's trigger still small when reversed again on the pruned model?

    TROJANPRUNE_DATA=../shared/datasets OMP_NUM_THREADS=1 python benchmarks/recheck_diagnosis.py \
        benchmarks/zoo/cifar10-vgg_small-badnets 1 >> OUT.jsonl

Prints one JSON line: the repair (``recheck=0``, one image per class, the seed), its ASR on the
first 2,000 test images (the true trigger, for this diagnosis only), the detection's mask norms,
and for the original and the pruned model the norms of three new reverses of the target's
trigger with their signed anomaly index among the detection's norms of the other classes
(positive: below the median). The record ``results/shappruning-stop35/recheck-diagnosis.jsonl``
was made with a scratch copy, before the option existed (the same computation; its repairs
are the walk alone, as ``recheck=0``).
"""
import json
import sys
import time

import torch

import trojanprune as tp
from trojanprune import data, metrics
from trojanprune.reverse import anomaly_index, reverse_triggers
from trojanprune.runs import load_run

torch.set_num_threads(1)
run_dir, seed = sys.argv[1], int(sys.argv[2])
run = load_run(run_dir)
attack, test = run.attack(), run.test_set(None).subset(range(2000))
ds = run.record["dataset"]
train = data.load_dataset(ds["name"], "train", image_size=ds.get("image_size"))
clean = data.clean_subset(train, per_class=1, seed=seed)
start = time.time()
res = tp.repair(run.model, clean, method="shappruning", seed=seed, recheck=0)
seconds = time.time() - start
after = metrics.evaluate(res.model.cpu(), test, attack)
d, t = res.details, res.target
norms = torch.tensor(d["reverse"]["mask_norms"])
out = {"run": run_dir, "seed": seed, "target": t, "space": d.get("trigger_space"),
       "pruned": res.pruned, "acc": after["acc"], "asr": after["asr"],
       "reason": d["mitigation"]["reason"], "norms": d["reverse"]["mask_norms"],
       "repair_s": round(seconds, 1)}
if t is not None:
    x, y = clean.tensors()
    for label, model in (("original", run.model), ("on_pruned", res.model)):
        again = reverse_triggers(model, x, y, len(norms), steps=300, success_threshold=0.9,
                                 classes=[t] * 3, seed=seed + 1000)
        signed = []
        for v in again.mask_norms:
            n = norms.clone()
            n[t] = v
            signed.append(round(float(anomaly_index(n)[t]) * (1 if v < n.median() else -1), 2))
        out[label] = {"norms": [round(float(v), 2) for v in again.mask_norms],
                      "signed_index": signed,
                      "success": [round(float(v), 3) for v in again.attack_success]}
print(json.dumps(out), flush=True)
