"""A repair as one self-contained HTML page: verdict, reversed trigger, per-channel scores, the
ACC/ASR-vs-pruned-channels curve, what was pruned per layer, metrics, cost and options.

The page has no external resources: images are inline base64 PNGs drawn with matplotlib's Agg
backend, the CSS is inline, there are no scripts or web fonts, and every piece of text is
HTML-escaped (method options and details come from users and models).

- :func:`render_report` returns the HTML text, :func:`write_report` writes it atomically.
- :func:`pruning_curve` measures ACC/ASR/RA after pruning the first k channels of a defense's
  pruned list (in the order the method ranked them, see :func:`ranked_pruned`), for a handful
  of k, batched with :class:`~trojanprune.engine.MaskEvaluator`. It needs the test set and the
  true attack, so it is only computed when a run knows its trigger.
"""

from __future__ import annotations

import base64
import datetime
import html
import io
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch

from .defenses.base import method_decision
from .errors import ConfigError, TrojanPruneError
from .utils import write_atomic

# -------------------------------------------------------------------------------------------
# per-channel scores found in a result's details
# -------------------------------------------------------------------------------------------


@dataclass
class ScoreSet:
    """One per-channel score of a method: {layer: [score per channel]}.

    ``prunes_high``: True when a high score marks a channel to prune (Shapley value, ONP's
    prune probability, CLP's Lipschitz bound), False when a low one does (ANP/RNP masks, FP's
    mean activation). ``by_group``: the keys are unit-group names (those ``pruned`` uses); CLP
    reports per conv layer, which for a residual group is one of several layers.
    """

    key: str
    label: str
    values: dict[str, list[float]]
    prunes_high: bool
    note: str = ""
    by_group: bool = True
    thresholds: dict[str, float] | None = None
    axis: str = ""  # short y-axis label


def _floats(value) -> list[float] | None:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().flatten().tolist()
    if isinstance(value, (list, tuple)) and len(value) > 0 and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        return [float(v) for v in value]
    return None


def _score_dict(value) -> dict[str, list[float]] | None:
    """{str: numeric list} or None."""
    if not isinstance(value, Mapping) or not value:
        return None
    out = {}
    for k, v in value.items():
        vals = _floats(v)
        if not isinstance(k, str) or vals is None:
            return None
        out[k] = vals
    return out


def _get(d: Any, *path):
    for p in path:
        if not isinstance(d, Mapping) or p not in d:
            return None
        d = d[p]
    return d


# Known per-channel scores: (method, path in details, label, axis label, high = prune, note).
_KNOWN = [
    ("shappruning", ("shapley", "values"), "Shapley value (backdoor contribution)", "Shapley value", True,
     "Estimated Shapley value of each channel for the reversed trigger's effect; the "
     "mitigation prunes down this ranking."),
    ("onp", ("policy_prune_probability",), "ONP policy prune probability", "prune probability", True,
     "Probability that the trained GNN policy prunes each channel."),
    ("anp", ("mask_values",), "ANP mask value", "mask value", False,
     "Optimized mask value under adversarial neuron perturbation; low values are pruned."),
    ("rnp", ("mask_values",), "RNP recovered mask value", "mask value", False,
     "Mask recovered on the unlearned model; low values are pruned."),
]


def score_sets(result) -> list[ScoreSet]:
    """Every per-channel score in ``result.details``, labelled by method. Known layouts first
    (ShapPruning, ONP, ANP, RNP, CLP, FP); then, generically, any other {module name: [number
    per channel]} dict found in the details (checked against the repaired model's modules)."""
    details = getattr(result, "details", None) or {}
    method = getattr(result, "method", "")
    sets: list[ScoreSet] = []
    used: set[int] = set()
    for name, path, label, axis, high, note in _KNOWN:
        found = _score_dict(_get(details, *path))
        if found is not None and name == method:
            sets.append(ScoreSet(".".join(path), label, found, high, note, axis=axis))
            used.add(id(_get(details, *path)))
    if method == "clp" and isinstance(details.get("groups"), Mapping):
        layers, thresholds = {}, {}
        for group in details["groups"].values():
            for layer, info in (_get(group, "layers") or {}).items():
                vals = _floats(_get(info, "uclc"))
                if vals is not None:
                    layers[layer] = vals
                    if isinstance(info.get("threshold"), (int, float)):
                        thresholds[layer] = float(info["threshold"])
        if layers:
            sets.append(ScoreSet("groups.*.layers.*.uclc", "CLP upper channel Lipschitz bound "
                                 "(UCLC)", layers, True,
                                 f"Channels above mean + u*std of their layer (u = "
                                 f"{details.get('u')}) are pruned; the dashed line is that "
                                 "threshold.", by_group=False, thresholds=thresholds,
                                 axis="UCLC"))
    if method == "fp":
        act = _floats(details.get("mean_activation"))
        if act is not None and isinstance(details.get("layer"), str):
            sets.append(ScoreSet("mean_activation", "FP mean activation on clean data",
                                 {details["layer"]: act}, False,
                                 "Fine-Pruning prunes the channels least active on clean data "
                                 "first.", axis="mean activation"))
    modules = _module_names(result)
    for path, found in _scan(details, ()):
        if id(found[1]) in used or path in {s.key for s in sets}:
            continue
        values = found[0]
        if modules and set(values) <= modules and max(len(v) for v in values.values()) > 1:
            sets.append(ScoreSet(path, f"{method} details: {path}", values, True,
                                 "A per-channel quantity found in the method's details "
                                 "(its direction is not known to the report).",
                                 axis=path.rsplit(".", 1)[-1]))
    return sets


def _module_names(result) -> set[str]:
    model = getattr(result, "model", None)
    if isinstance(model, torch.nn.Module):
        return {n for n, _ in model.named_modules() if n}
    return set()


def _scan(d, path: tuple, depth: int = 0):
    if not isinstance(d, Mapping) or depth > 3:
        return
    found = _score_dict(d)
    if found is not None and path:
        yield ".".join(path), (found, d)
        return
    for k, v in d.items():
        if isinstance(k, str):
            yield from _scan(v, path + (k,), depth + 1)


def ranked_pruned(result) -> list[tuple[str, int]]:
    """``result.pruned`` in the order the method ranks its channels: FP's prune order, else
    the first score set's ranking (highest or lowest first, as the method prunes), else the
    list as the method returned it."""
    pruned = [(str(g), int(c)) for g, c in getattr(result, "pruned", [])]
    details = getattr(result, "details", None) or {}
    if getattr(result, "method", "") == "fp" and isinstance(details.get("prune_order"), list):
        rank = {(details.get("layer"), int(c)): i for i, c in enumerate(details["prune_order"])}
        return sorted(pruned, key=lambda u: rank.get(u, len(rank)))
    score = _group_scores(result)
    if not score:
        return pruned
    position = {u: i for i, u in enumerate(pruned)}
    return sorted(pruned, key=lambda u: (-score[u] if u in score else math.inf, position[u]))


def _group_scores(result) -> dict[tuple[str, int], float]:
    """(group, channel) -> a score where larger = pruned earlier."""
    for s in score_sets(result):
        if s.by_group:
            sign = 1.0 if s.prunes_high else -1.0
            return {(g, c): sign * v for g, vals in s.values.items() for c, v in enumerate(vals)}
        if getattr(result, "method", "") == "clp":  # z-score within each conv, max per group
            out: dict[tuple[str, int], float] = {}
            groups = (getattr(result, "details", None) or {}).get("groups", {})
            for gname, group in groups.items():
                for info in (group.get("layers") or {}).values():
                    vals = torch.tensor(_floats(info.get("uclc")) or [0.0])
                    z = (vals - vals.mean()) / vals.std() if len(vals) > 1 and vals.std() > 0 else vals * 0
                    for c, v in enumerate(z.tolist()):
                        out[(gname, c)] = max(out.get((gname, c), -math.inf), v)
            return out
    return {}


# -------------------------------------------------------------------------------------------
# ACC / ASR against the number of pruned channels
# -------------------------------------------------------------------------------------------


def curve_points(n: int, points: int) -> list[int]:
    """``points`` evenly spread values of k in [0, n], always including 0 and n."""
    if points < 2:
        raise ConfigError(f"a pruning curve needs at least 2 points, got {points}")
    return sorted({round(i * n / (points - 1)) for i in range(points)})


@torch.no_grad()
def pruning_curve(model: torch.nn.Module, pruned_in_order: Sequence[tuple[str, int]], test, attack,
                  example: torch.Tensor | None = None, *, points: int = 9,
                  max_images: int | None = 2000, seed: int = 0) -> list[dict]:
    """ACC, ASR and RA (percent) after masking the first k of ``pruned_in_order`` in ``model``
    (the model BEFORE repair), for ``points`` values of k from 0 to all of them.

    ``test``: an image dataset with uint8 ``images`` (N, C, H, W) and ``labels``; at most
    ``max_images`` of it (a seeded random subset; None = all) are used. ``attack``: the true
    attack, for ASR/RA (BackdoorBench's convention, as :mod:`trojanprune.metrics`). All k are
    evaluated as one batch of masks with prefix reuse. Masking equals pruning for every method
    that only prunes; for one that also fine-tunes (FP), the last point is the pruned model
    before fine-tuning. Returns ``[{"k", "acc", "asr", "ra"}, ...]``.
    """
    from .engine import MaskEvaluator, discover_units

    if attack is None:
        raise ConfigError("a pruning curve needs the true attack (the run's trigger) for ASR")
    images, labels = getattr(test, "images", None), getattr(test, "labels", None)
    if not isinstance(images, torch.Tensor) or not isinstance(labels, torch.Tensor) or len(images) == 0:
        raise ConfigError("a pruning curve needs a non-empty test set with images and labels")
    if max_images is not None and len(images) > max_images:
        pick = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:max_images]
        images, labels = images[pick.sort().values], labels[pick.sort().values]
    x = images.float() / 255 if images.dtype == torch.uint8 else images.float()
    y = labels.long()
    units = discover_units(model, x[:1] if example is None else example)
    pruned = [(str(g), int(c)) for g, c in pruned_in_order]
    units.keep_mask(pruned)  # validates names and channels with a clear error
    ks = curve_points(len(pruned), points)
    masks = torch.stack([units.keep_mask(pruned[:k]) for k in ks])
    acc = MaskEvaluator(model, units, x, y).accuracy(masks)
    triggered, target, keep = attack.asr_inputs(x, y)
    out = [{"k": k, "acc": round(100 * float(a), 4)} for k, a in zip(ks, acc)]
    if bool(keep.any()):
        pred = MaskEvaluator(model, units, triggered[keep]).logits(masks).argmax(-1).cpu()
        asr = (pred == target[keep].cpu()).float().mean(1)
        ra = (pred == y[keep].cpu()).float().mean(1)
        for row, a, r in zip(out, asr, ra):
            row.update(asr=round(100 * float(a), 4), ra=round(100 * float(r), 4))
    for row in out:
        row["images"] = len(x)
    return out


# -------------------------------------------------------------------------------------------
# figures
# -------------------------------------------------------------------------------------------

_RED, _BLUE, _GREEN, _GREYS = "#c62828", "#1565c0", "#2e7d32", ("#90a4ae", "#b0bec5")


def _figure(width: float, height: float):
    """A matplotlib figure drawn by the Agg backend, without pyplot (no global state, no GUI)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig, fig.subplots()


def _figure_png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _image_png(image: torch.Tensor) -> str:
    """A CHW (or HW) float image in [0, 1] as a base64 PNG at its own resolution."""
    from matplotlib.image import imsave

    t = image.detach().float().cpu().clamp(0, 1)
    if t.dim() == 3 and t.shape[0] == 1:
        t = t[0]
    elif t.dim() == 3:
        t = t[:3].permute(1, 2, 0)
    if t.dim() not in (2, 3):
        raise ConfigError(f"cannot draw an image of shape {tuple(image.shape)}")
    buf = io.BytesIO()
    if t.dim() == 2:
        imsave(buf, t.numpy(), cmap="gray", vmin=0, vmax=1, format="png")
    else:
        imsave(buf, t.numpy(), format="png")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _score_figure(s: ScoreSet, pruned: set[tuple[str, int]]) -> str:
    """All channels of all layers side by side (one bar each), pruned ones in red."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Rectangle

    layers = list(s.values)
    total = sum(len(v) for v in s.values.values())
    fig, ax = _figure(11, 2.9)
    start = 0
    centers, names = [], []
    width = 1.0 if total < 400 else 1.2
    for i, layer in enumerate(layers):
        vals = s.values[layer]
        xs = list(range(start, start + len(vals)))
        hit = [(layer, c) in pruned for c in range(len(vals))] if s.by_group else [False] * len(vals)
        colors = [_RED if h else _GREYS[i % 2] for h in hit]
        ax.bar(xs, vals, width=width, color=colors, linewidth=0)
        if any(hit):
            hx = [x for x, h in zip(xs, hit) if h]
            hv = [v for v, h in zip(vals, hit) if h]
            ax.scatter(hx, hv, s=14, color=_RED, zorder=3)
        if s.thresholds and layer in s.thresholds:
            ax.hlines(s.thresholds[layer], start - 0.5, start + len(vals) - 0.5, colors=_BLUE,
                      linestyles="dashed", linewidth=1)
        if i:
            ax.axvline(start - 0.5, color="#455a64", linewidth=0.6)
        centers.append(start + (len(vals) - 1) / 2)
        names.append(layer)
        start += len(vals)
    step = max(1, math.ceil(len(layers) / 14))
    ax.set_xticks(centers[::step])
    ax.set_xticklabels(names[::step], rotation=30 if len(layers) > 4 else 0, ha="right"
                       if len(layers) > 4 else "center", fontsize=8)
    ax.set_xlim(-1, total)
    ax.axhline(0, color="#37474f", linewidth=0.6)
    ax.set_ylabel(_short(s.axis or s.label, 28), fontsize=9)
    ax.tick_params(axis="y", labelsize=8)
    ax.grid(axis="y", alpha=0.3)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    legend = [Rectangle((0, 0), 1, 1, color=_GREYS[0], label="kept")]
    if s.by_group:
        legend.append(Rectangle((0, 0), 1, 1, color=_RED, label="pruned"))
    if s.thresholds:
        legend.append(Line2D([0], [0], color=_BLUE, linestyle="dashed", label="threshold"))
    ax.legend(handles=legend, fontsize=8, loc="lower left", bbox_to_anchor=(0, 1.0),
              frameon=False, ncol=len(legend), borderaxespad=0.2)
    return _figure_png(fig)


def _curve_figure(curve: list[dict], total: int | None) -> str:
    ks = [row["k"] for row in curve]
    fig, ax = _figure(7.5, 3.4)
    ax.plot(ks, [row["acc"] for row in curve], "o-", color=_BLUE, label="ACC (clean accuracy)")
    if all("asr" in row for row in curve):
        ax.plot(ks, [row["asr"] for row in curve], "s-", color=_RED, label="ASR (attack success)")
        ax.plot(ks, [row["ra"] for row in curve], "^--", color=_GREEN, alpha=0.8,
                label="RA (robust accuracy)")
    ax.set_xlabel("channels pruned (in the method's ranking order)"
                  + (f", of {total}" if total else ""), fontsize=9)
    ax.set_ylabel("%", fontsize=9)
    ax.set_ylim(-3, 103)
    if ks:
        ax.set_xlim(min(ks) - 0.5, max(ks) + 0.5)
        if max(ks) <= 20:
            ax.set_xticks(sorted(set(ks)))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=3, frameon=False)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    return _figure_png(fig)


def _short(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


# -------------------------------------------------------------------------------------------
# HTML
# -------------------------------------------------------------------------------------------

_CSS = """
body{font-family:-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;color:#1f2933;
 margin:0;background:#f4f6f8;line-height:1.45}
main{max-width:1120px;margin:0 auto;padding:24px 28px 48px;background:#fff;min-height:100vh}
h1{font-size:1.55em;margin:0 0 4px}
h2{font-size:1.15em;margin:30px 0 10px;padding-bottom:4px;border-bottom:1px solid #d9e2ec}
h3{font-size:1em;margin:18px 0 6px}
.sub{color:#52606d;font-size:.9em;margin:0 0 14px}
.badges{display:flex;flex-wrap:wrap;gap:10px;margin:14px 0}
.badge{border-radius:6px;padding:8px 14px;background:#eef2f6;font-size:.95em}
.badge b{display:block;font-size:.75em;color:#52606d;font-weight:600;text-transform:uppercase;
 letter-spacing:.04em}
.badge.bad{background:#fdecea;color:#8a1c1c}.badge.good{background:#e8f5e9;color:#1b5e20}
table{border-collapse:collapse;font-size:.9em;margin:6px 0}
th,td{border:1px solid #d9e2ec;padding:4px 10px;text-align:left;vertical-align:top}
th{background:#f0f4f8;font-weight:600}
td.num,th.num{text-align:right;font-variant-numeric:tabular-nums}
.idx{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:.85em;max-width:640px;
 word-break:break-word}
.trig{display:flex;gap:22px;flex-wrap:wrap}
.trig figure{margin:0;text-align:center;width:170px}
table.kv th{background:#f7f9fb;font-weight:500}
.trig img{width:150px;height:150px;image-rendering:pixelated;border:1px solid #cbd2d9;
 background:#000}
.trig img.wide{width:auto;max-width:480px;height:150px}
.trig figure.wide{width:auto}
figcaption{font-size:.82em;color:#52606d;margin-top:4px}
img.plot{max-width:100%;height:auto;display:block}
.note{color:#52606d;font-size:.86em;margin:4px 0 8px}
pre{background:#f5f7fa;border:1px solid #e4e7eb;padding:10px;font-size:.78em;overflow:auto;
 max-height:420px;white-space:pre-wrap;word-break:break-word}
details summary{cursor:pointer;color:#334e68;font-weight:600}
.decision{background:#f7f9fb;border-left:3px solid #829ab1;padding:6px 12px;font-size:.92em}
footer{margin-top:36px;color:#7b8794;font-size:.8em}
"""

_IMAGE_NAMES = {
    "trigger_mask": "reversed trigger: mask",
    "trigger_pattern": "reversed trigger: pattern",
    "trigger_stamp": "reversed trigger: mask × pattern (what is stamped)",
    "synthetic_images": "synthesized inputs (data-free)",
    "trigger_warp_displacement": "reversed warp: how far each pixel moves (white: as far as its bound allows)",
    "unused_pixel_trigger_mask": "pixel-space reversed trigger (not used: another reverse's was): mask",
    "unused_pixel_trigger_pattern": "pixel-space reversed trigger (not used): pattern",
    "unused_pixel_trigger_stamp": "pixel-space reversed trigger (not used): mask × pattern",
}


def _caption(name: str) -> str:
    """A picture's caption: the known names, and ONP's ``reversed_trigger_<part>[_class<k>]``."""
    if name in _IMAGE_NAMES:
        return _IMAGE_NAMES[name]
    onp = re.fullmatch(r"reversed_trigger_(mask|pattern)(?:_class(\d+))?", name)
    if onp:
        part = "mask" if onp[1] == "mask" else "mask × pattern (what is stamped)"
        who = f" for class {onp[2]}" if onp[2] else ""
        return f"pixel-space reversed trigger{who}: {part}"
    warp = re.fullmatch(r"reversed_warp_displacement(?:_class(\d+))?", name)
    if warp:
        who = f" for class {warp[1]}" if warp[1] else ""
        return f"reversed warp{who}: how far each pixel moves (white: as far as its bound allows)"
    return name


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _num(value: Any, digits: int = 2, suffix: str = "") -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "—" if value is None else _e(value)
    if isinstance(value, float) and math.isnan(value):
        return "n/a"
    return f"{value:.{digits}f}{suffix}" if isinstance(value, float) else f"{value}{suffix}"


def _table(header: Sequence[str], rows: Iterable[Sequence[Any]], numeric: Sequence[bool] = ()) -> str:
    """Rows of already-escaped cells (use _e/_num to build them)."""
    num = list(numeric) + [False] * (len(header) - len(numeric))
    head = "".join(f'<th class="num">{h}</th>' if n else f"<th>{h}</th>" for h, n in zip(header, num))
    body = "".join("<tr>" + "".join(f'<td class="num">{c}</td>' if n else f"<td>{c}</td>"
                                     for c, n in zip(row, num)) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _verdict(result, record) -> tuple[str, str]:
    verdict = getattr(result, "verdict", None) or record.get("verdict")
    if verdict is None:
        return "no verdict (the method does not test for a backdoor)", ""
    text = str(verdict)
    return text, ("bad" if "detected" in text and not text.startswith("no") else "good")


def _metrics_table(record: Mapping) -> str:
    before, after = record.get("before") or {}, record.get("after") or {}
    if not before and not after:
        return '<p class="note">Not measured (the run was repaired with --no-eval).</p>'
    rows = []
    names = {"acc": "ACC: clean accuracy", "asr": "ASR: attack success rate",
             "ra": "RA: robust accuracy (true label under the trigger)"}
    for key in ("acc", "asr", "ra"):
        if key not in before and key not in after:
            continue
        b, a = before.get(key), after.get(key)
        delta = a - b if isinstance(a, (int, float)) and isinstance(b, (int, float)) else None
        rows.append([_e(names[key]), _num(b, 2, " %"), _num(a, 2, " %"),
                     "—" if delta is None else f"{delta:+.2f} pp"])
    out = _table(["metric", "before", "after", "change"], rows, [False, True, True, True])
    if "der" in record:
        out += (f'<p class="note">DER (defense effectiveness rating, 50 % = no change, 100 % = '
                f'perfect): <b>{_num(record["der"], 2, " %")}</b></p>')
    elif "asr" not in after:
        out += '<p class="note">ASR/RA need the true trigger: pass --attack (a run directory ' \
               'knows its own).</p>'
    return out


def _pruned_table(result, record, sets: list[ScoreSet]) -> str:
    pruned = record.get("pruned")
    if pruned is None:
        pruned = [[g, c] for g, c in getattr(result, "pruned", [])]
    if not pruned:
        return '<p class="note">Nothing was pruned.</p>'
    per: dict[str, list[int]] = {}
    for g, c in pruned:
        per.setdefault(str(g), []).append(int(c))
    sizes = {}
    for s in sets:
        if s.by_group:
            for g, v in s.values.items():
                sizes.setdefault(g, len(v))
    rows = [[f"<code>{_e(g)}</code>", str(len(chans)),
             _e(sizes.get(g, "?")), f'<span class="idx">{_e(", ".join(map(str, sorted(chans))))}</span>']
            for g, chans in per.items()]
    total = record.get("total_units", getattr(result, "total_units", None))
    rows.append(["<b>total</b>", f"<b>{len(pruned)}</b>", _e(total if total is not None else "?"), ""])
    return _table(["layer (unit group)", "pruned", "channels", "channel indices"], rows,
                  [False, True, True, False])


def _trigger_section(images: Mapping[str, torch.Tensor]) -> str:
    if not images:
        return ""
    figs = []
    for name, image in images.items():
        if not isinstance(image, torch.Tensor):
            continue
        t = image if image.dim() == 3 else image.unsqueeze(0)
        wide = t.shape[-1] > 1.6 * t.shape[-2]
        size = "×".join(str(s) for s in t.shape[-2:])
        cls = ' class="wide"' if wide else ""
        figs.append(f'<figure{cls}><img{cls} alt="{_e(name)}" '
                    f'src="data:image/png;base64,{_image_png(image)}"><figcaption>'
                    f'{_e(_caption(name))}<br>{_e(size)} px</figcaption></figure>')
    if not figs:
        return ""
    trig = any(n.startswith("trigger_") for n in images)
    title = "Reversed trigger" if trig else "Images"
    note = ("The trigger the method reconstructed from the model alone (never given the true "
            "one), for the suspected target class." if trig else "")
    return (f"<h2>{title}</h2>" + (f'<p class="note">{_e(note)}</p>' if note else "")
            + f'<div class="trig">{"".join(figs)}</div>')


def _curve_section(curve: list[dict] | None, record: Mapping) -> str:
    if curve and len(curve) < 2:
        row = curve[0]
        asr = f", ASR {row['asr']:.2f} %" if "asr" in row else ""
        return ('<h2>ACC / ASR against pruned channels</h2><p class="note">Nothing was pruned, '
                f'so there is no curve: with every channel kept, ACC {row["acc"]:.2f} %{asr} on '
                f'{row.get("images", "the")} test images.</p>')
    if not curve:
        return ('<h2>ACC / ASR against pruned channels</h2><p class="note">Not computed: the '
                'curve needs the test set and the true trigger (a run directory with its '
                'attack, or --attack).</p>')
    total = record.get("total_units")
    png = _curve_figure(curve, total)
    has_asr = all("asr" in r for r in curve)
    rows = [[str(r["k"]), _num(r["acc"], 2, " %")]
            + ([_num(r["asr"], 2, " %"), _num(r["ra"], 2, " %")] if has_asr else []) for r in curve]
    header = ["channels pruned", "ACC"] + (["ASR", "RA"] if has_asr else [])
    n = curve[0].get("images")
    note = ("The model before repair with the first k channels of the method's pruned list "
            "removed, in the order the method ranked them"
            + (f", measured on {n:,} test images" if isinstance(n, int) else "")
            + ". The last point is the method's pruning (before any fine-tuning it does).")
    return (f'<h2>ACC / ASR against pruned channels</h2><p class="note">{_e(note)}</p>'
            f'<img class="plot" alt="pruning curve" src="data:image/png;base64,{png}">'
            + _table(header, rows, [True] * len(header)))


def _scores_section(sets: list[ScoreSet], result) -> str:
    if not sets:
        return ""
    pruned = {(str(g), int(c)) for g, c in getattr(result, "pruned", [])}
    parts = ["<h2>Per-channel scores</h2>"]
    for s in sets:
        n = sum(len(v) for v in s.values.values())
        direction = "high values are pruned first" if s.prunes_high else "low values are pruned first"
        parts.append(f"<h3>{_e(s.label)}</h3><p class=\"note\">{_e(s.note)} {n:,} channels in "
                     f"{len(s.values)} layer(s); {_e(direction)}; pruned channels in red. "
                     f"<code>details.{_e(s.key)}</code></p>")
        parts.append(f'<img class="plot" alt="{_e(s.label)}" '
                     f'src="data:image/png;base64,{_score_figure(s, pruned)}">')
    return "".join(parts)


def _options_table(options: Mapping, per_row: int = 3) -> str:
    """Options as key/value pairs, ``per_row`` pairs side by side."""
    if not options:
        return '<p class="note">(none)</p>'
    cells = [f"<th><code>{_e(k)}</code></th><td><code>{_e(json.dumps(v, default=str))}</code></td>"
             for k, v in options.items()]
    cells += ["<th></th><td></td>"] * (-len(cells) % per_row)
    rows = "".join("<tr>" + "".join(cells[i:i + per_row]) + "</tr>"
                   for i in range(0, len(cells), per_row))
    return f'<table class="kv">{rows}</table>'


def _kv_table(rows: Sequence[tuple[str, str]]) -> str:
    """Key/value rows (values already escaped)."""
    return ('<table class="kv">' + "".join(f"<tr><th>{_e(k)}</th><td>{v}</td></tr>" for k, v in rows)
            + "</table>")


def _details_dump(details: Mapping, sets: list[ScoreSet], limit: int = 40_000) -> str:
    from .defenses.base import _jsonable

    skip = {s.key for s in sets}

    def prune(d, path=()):
        if isinstance(d, Mapping):
            return {k: ("<per-channel scores: plotted above>" if ".".join(path + (str(k),)) in skip
                        else prune(v, path + (str(k),))) for k, v in d.items()}
        return d

    text = json.dumps(prune(_jsonable(dict(details))), indent=1, default=str)
    if len(text) > limit:
        text = text[:limit] + f"\n… ({len(text) - limit:,} more characters in repair.json)"
    return (f"<details><summary>Method details (JSON)</summary><pre>{_e(text)}</pre></details>")


def render_report(result, record: Mapping, *, curve: list[dict] | None = None,
                  title: str | None = None) -> str:
    """The report of one repair as a self-contained HTML page (a string)."""
    if not isinstance(record, Mapping):
        raise ConfigError("record must be the dict returned by repair_and_measure")
    method = record.get("method") or getattr(result, "method", "?")
    title = title or f"trojanprune repair report: {method}"
    sets = score_sets(result)
    verdict, tone = _verdict(result, record)
    target = getattr(result, "target", None)
    target = record.get("target") if target is None else target
    seconds = record.get("seconds", getattr(result, "seconds", None))
    evaluations = record.get("evaluations", getattr(result, "evaluations", None))
    pruned_count = record.get("pruned_count", len(getattr(result, "pruned", [])))
    total = record.get("total_units", getattr(result, "total_units", None))
    after = record.get("after") or {}
    suspects = ((record.get("details") or {}).get("probe") or {}).get("suspects")
    if target is None and suspects:  # ONP's suspects probe: several classes, no single target
        target_text = "suspects " + ", ".join(f"{s['class']} ({s['space']})" for s in suspects)
    else:
        target_text = "not identified" if target is None else target
    badges = [("verdict", verdict, tone),
              ("target class", target_text, ""),
              ("pruned", f"{pruned_count} of {total} channels" if total else f"{pruned_count} channels", "")]
    if "asr" in after:
        badges.append(("ASR after", f"{after['asr']:.2f} %", "good" if after["asr"] < 20 else "bad"))
    if "acc" in after:
        badges.append(("ACC after", f"{after['acc']:.2f} %", ""))
    if "der" in record:
        badges.append(("DER", f"{record['der']:.2f} %", ""))
    badge_html = "".join(f'<div class="badge {cls}"><b>{_e(k)}</b>{_e(v)}</div>' for k, v, cls in badges)
    options = record.get("options", getattr(result, "options", {})) or {}
    details = getattr(result, "details", None) or record.get("details") or {}
    images = getattr(result, "images", None) or {}
    run_rows = [["method", f"<code>{_e(method)}</code>"], ["seed", _e(record.get("seed", "—"))],
                ["clean images given to the defense", _e(record.get("clean_images", "—"))],
                ["time", _num(seconds, 1, " s")], ["model evaluations", _num(evaluations, 0)]]
    if isinstance(record.get("peak_rss_mib"), (int, float)):
        run_rows.append(["peak memory", f"{record['peak_rss_mib']:.0f} MiB"])
    stamp = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    from . import __version__

    body = [
        f"<h1>{_e(title)}</h1>",
        f'<p class="sub">Backdoor repair by pruning · method <b>{_e(method)}</b> · seed '
        f'{_e(record.get("seed", "—"))}</p>',
        f'<div class="badges">{badge_html}</div>',
        (f'<p class="decision"><b>The method\'s decision:</b> {_e(method_decision(details))}</p>'
         if method_decision(details) else ""),
        "<h2>Metrics before and after</h2>", _metrics_table(record),
        _trigger_section(images),
        _curve_section(curve, record),
        _scores_section(sets, result),
        "<h2>What was pruned, per layer</h2>", _pruned_table(result, record, sets),
        "<h2>Cost</h2>", _kv_table(run_rows),
        "<h2>Method options</h2>", _options_table(options),
        _details_dump(details, sets) if details else "",
        f"<footer>trojanprune {_e(__version__)} · written {_e(stamp)}</footer>",
    ]
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{_e(title)}</title><style>{_CSS}</style></head><body><main>"
            + "\n".join(b for b in body if b) + "</main></body></html>\n")


def write_report(path: str | Path, result, record: Mapping, *, curve: list[dict] | None = None,
                 title: str | None = None) -> Path:
    """Render the report and write it to ``path`` atomically (complete or not at all)."""
    path = Path(path)
    text = render_report(result, record, curve=curve, title=title)
    if not path.parent.is_dir():
        raise TrojanPruneError(f"cannot write {path}: folder {path.parent} does not exist")
    return write_atomic(path, text)


__all__ = ["ScoreSet", "curve_points", "pruning_curve", "ranked_pruned", "render_report",
           "score_sets", "write_report"]
