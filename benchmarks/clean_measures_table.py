"""The markdown table of ``clean_measures.py``'s JSON lines: each clean measure's drop
(points; the KL in nats) beside the test drop, their means, and each measure's correlation
with the test drop across the prunings.

    python benchmarks/clean_measures_table.py benchmarks/results/onp-stop37/clean-measures.jsonl
"""

import json
import statistics
import sys

COLUMNS = [("held", "top1"), ("held", "soft"), ("all", "top1"), ("all", "soft")]
NAMES = (("badnets", "BadNets"), ("blended", "Blended"), ("wanet", "WaNet"), ("sig", "SIG"))


def drop(row, part, measure):
    return 100 * (row[part][measure][0] - row[part][measure][1])


rows = [json.loads(line) for line in open(sys.argv[1])]
test = [drop(r, "test", "top1") for r in rows]
kl = [r["all"]["kl"] for r in rows]
for r in rows:
    name = r["cell"]
    for word, shown in NAMES:
        name = name.replace(word, shown)
    print(f"| {name} | " + " | ".join(f"{drop(r, *c):.1f}" for c in COLUMNS)
          + f" | {r['all']['kl']:.3f} | **{drop(r, 'test', 'top1'):.2f}** |")
print("| mean | " + " | ".join(f"{statistics.mean(drop(r, *c) for r in rows):.2f}" for c in COLUMNS)
      + f" | {statistics.mean(kl):.3f} | {statistics.mean(test):.2f} |")
print("| correlation with the test drop | "
      + " | ".join(f"{statistics.correlation([drop(r, *c) for r in rows], test):.2f}" for c in COLUMNS)
      + f" | {statistics.correlation(kl, test):.2f} | |")
print(f"\n(test soft drop, mean: {statistics.mean(drop(r, 'test', 'soft') for r in rows):.2f})")
