"""Stop 37's table: ONP's seed-0 grid cells (top-1 accuracy, today's default) beside the
repairs with ``accuracy=soft`` (benchmarks/results/onp-stop37/soft-ARCH-ATTACK.json).

    python benchmarks/onp_soft_table.py
"""
import json
from pathlib import Path

from refine_steps import target_met as met

grid = {}
for g in ["grid-cifar10-vgg_small", "grid-cifar10-resnet20"]:
    for l in open(f"benchmarks/results/{g}/results.jsonl"):
        c = json.loads(l)
        if c.get("defense") == "onp" and c["status"] == "ok":
            grid[f"{c['arch']}-{c['attack']}"] = c
rows = []
for key in ["vgg_small-badnets", "vgg_small-blended", "vgg_small-wanet", "vgg_small-sig",
            "resnet20-badnets", "resnet20-blended", "resnet20-wanet", "resnet20-sig"]:
    c = grid[key]
    path = Path(f"benchmarks/results/onp-stop37/soft-{key}.json")
    r = json.loads(path.read_text()) if path.exists() and path.stat().st_size else None
    gd = c["acc_before"] - c["acc_after"]
    g = f"{c['asr_after']:.2f} / {-gd:.2f} / {c['der']:.2f}" + (" (met)" if met(c['asr_after'], gd) else "")
    if r:
        d = r["before"]["acc"] - r["after"]["acc"]
        s = f"{r['after']['asr']:.2f} / {-d:.2f} / {r['der']:.2f}" + (" (met)" if met(r['after']['asr'], d) else "")
        rows.append((c["der"], r["der"], met(c['asr_after'], gd), met(r['after']['asr'], d)))
        extra = f" | {c['pruned_count']} -> {r['pruned_count']} | {r['seconds']:.0f}"
    else:
        s, extra = "(running)", " | |"
    print(f"| {key.replace('-', ' ')} | {g} | {s}{extra} |")
n = len(rows)
print(f"| **{n} cells: target met; mean DER** | **{sum(x[2] for x in rows)}; {sum(x[0] for x in rows)/n:.2f}** | **{sum(x[3] for x in rows)}; {sum(x[1] for x in rows)/n:.2f}** | | |")
