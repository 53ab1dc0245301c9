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

# The figures the text beside the table quotes, per fine-tuned variant.
print()
for k in keys[1:]:
    change = [-r["test"][k]["drop"] for r in rows]
    alive = [c for c, r in zip(change, rows) if r["test"][k]["acc"] > 20]  # not collapsed to a class
    versus = {sig: [r["test"][k]["acc"] - r["test"]["pruned"]["acc"] for r in rows if ("sig" in r["cell"]) == sig]
              for sig in (False, True)}
    costly = [r["test"]["pruned"]["drop"] - r["test"][k]["drop"] for r in rows if r["test"]["pruned"]["drop"] > 2.5]
    train = [r["train"][k]["final_train_acc"] for r in rows]
    print(f"- {k}: mean ACC change {sum(change) / len(rows):.2f} ({sum(alive) / len(alive):.2f} on the "
          f"{len(alive)} that did not collapse); ACC against the pruning's: non-SIG "
          f"{min(versus[False]):.1f} to {max(versus[False]):.1f}, SIG {min(versus[True]):.1f} to "
          f"{max(versus[True]):.1f}; ASR rises on {sum(r['test'][k]['asr'] > r['test']['pruned']['asr'] for r in rows)} "
          f"of {len(rows)}; on the {len(costly)} prunings that cost over 2.5 points it gives back "
          f"{min(costly):.2f} to {max(costly):.2f}; final training accuracy {min(train):.3f} to {max(train):.3f}")
