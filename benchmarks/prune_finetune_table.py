"""The markdown table of ``prune_finetune.py``'s JSON lines: ACC / ASR / drop per pruning and
variant, "(met)" where issue 5's target holds (ASR <= 2% at a drop of at most 2 points), and
the count and mean DER per variant.

    python benchmarks/prune_finetune_table.py A.jsonl [B.jsonl ...]
"""

import json
import sys

from refine_steps import target_met

rows = [json.loads(l) for f in sys.argv[1:] for l in open(f)]


def met(v):
    return target_met(v["asr"], v["drop"])


print("| pruning | channels | pruned: ACC / ASR / drop | fine-tuned, statistics kept | fine-tuned, statistics updated |")
print("|---|---|---|---|---|")
for r in rows:
    t = r["test"]
    print(f"| {r['cell']} | {r['pruned']} | " + " | ".join(
        f"{v['acc']:.2f} / {v['asr']:.2f} / {v['drop']:.2f}" + (" (met)" if met(v) else "") for v in t.values()) + " |")
keys = list(rows[0]["test"])
print(f"| **{len(rows)} prunings: target met; mean DER** | | " + " | ".join(
    f"**{sum(met(r['test'][k]) for r in rows)}; {sum(r['test'][k]['der'] for r in rows)/len(rows):.2f}**" for k in keys) + " |")
