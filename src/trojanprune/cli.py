"""The ``trojanprune`` command line: attack | eval | repair | bench | demo."""

from __future__ import annotations

import functools
import json
import time
from pathlib import Path
from typing import Optional

import typer

from .errors import ConfigError, TrojanPruneError
from .progress import log

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Remove backdoors from trained image classifiers by pruning.")

DATA_DIR_HELP = "Dataset root (else $TROJANPRUNE_DATA, else ~/.cache/trojanprune/data)."


def friendly_errors(fn):
    """One clear line and a non-zero exit for user errors and Ctrl-C; never a bare traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except TrojanPruneError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2)
        except KeyboardInterrupt:
            typer.echo("interrupted: nothing was written (outputs are only saved when complete)",
                       err=True)
            raise typer.Exit(130)
        except MemoryError:
            typer.echo("error: out of memory; use a smaller --batch-size or model", err=True)
            raise typer.Exit(2)

    return wrapper


def parse_settings(settings: list[str] | None) -> dict:
    """``--set key=value`` pairs; values are read as JSON when they parse (numbers, lists)."""
    out = {}
    for item in settings or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set takes key=value, got {item!r}")
        try:
            out[key.replace("-", "_")] = json.loads(value)
        except json.JSONDecodeError:
            out[key.replace("-", "_")] = value
    return out


# How a model trained elsewhere is put in the form every defense needs (images in [0, 1] in,
# logits out); recorded in the output run so that `eval` rebuilds the same function.
INPUT_MEAN = typer.Option(None, "--input-mean", help="Your model expects normalized inputs: "
                          "the per-channel mean, comma-separated (e.g. 0.485,0.456,0.406).")
INPUT_STD = typer.Option(None, "--input-std", help="The per-channel std of that normalization.")
OUTPUT_KEY = typer.Option(None, "--output-key", help="Your model returns more than the logits: "
                          "their index (e.g. 0 for (logits, features)) or key (e.g. logits).")
PROBABILITIES = typer.Option(False, "--probabilities", help="Your model ends in softmax: "
                             "use the log of its outputs as logits.")


def parse_adapter(mean: str | None, std: str | None, output_key: str | None,
                  probabilities: bool) -> dict | None:
    """The ``Adapted`` arguments the options above ask for (None: the model as it is)."""
    def floats(text, name):
        try:
            return [float(v) for v in text.split(",")]
        except ValueError:
            raise ConfigError(f"{name} takes comma-separated numbers, got {text!r}") from None

    adapter = {}
    if mean is not None or std is not None:
        if mean is None or std is None:
            raise ConfigError("pass both --input-mean and --input-std (one value per channel)")
        adapter["mean"], adapter["std"] = floats(mean, "--input-mean"), floats(std, "--input-std")
    if output_key is not None:
        adapter["output_key"] = int(output_key) if output_key.lstrip("-").isdigit() else output_key
    if probabilities:
        adapter["probabilities"] = True
    return adapter or None


@app.command()
@friendly_errors
def attack(
    attack_name: str = typer.Argument(..., metavar="ATTACK", help="badnets | blended | wanet | sig"),
    dataset: str = typer.Option(..., "--dataset", help="cifar10, gtsrb, mnist, an embedded set, "
                                "or imagefolder:PATH"),
    arch: str = typer.Option("vgg_small", help="Architecture name from the model registry."),
    out: Path = typer.Option(..., "--out", help="Run directory to create."),
    epochs: int = typer.Option(15),
    poison_rate: float = typer.Option(0.1, help="Fraction of the training set poisoned."),
    target: int = typer.Option(0, help="Target class."),
    mode: str = typer.Option("all-to-one", help="all-to-one | all-to-all (BadNets)"),
    seed: int = typer.Option(0),
    lr: float = typer.Option(0.01),
    batch_size: int = typer.Option(128),
    augment: Optional[str] = typer.Option(None, help="none | crop | crop+flip (default per dataset)"),
    train_size: Optional[int] = typer.Option(None, help="Train on a seeded subset of this size."),
    image_size: Optional[int] = typer.Option(None, help="Resize custom ImageFolder images."),
    settings: Optional[list[str]] = typer.Option(None, "--set", help="Attack option key=value."),
    data_dir: Optional[Path] = typer.Option(None, help=DATA_DIR_HELP),
    device: str = typer.Option("cpu", help="cpu | cuda | auto"),
    force: bool = typer.Option(False, help="Replace an existing run directory."),
    json_out: bool = typer.Option(False, "--json", help="Print the run record as JSON."),
):
    """Train a backdoored model and save it as a run directory (weights + run.json)."""
    from .experiment import make_backdoored_run

    if out.exists() and not force:
        raise TrojanPruneError(f"{out} already exists; choose another --out or pass --force")
    record = make_backdoored_run(
        attack_name, dataset, arch, out, epochs=epochs, poison_rate=poison_rate, target=target,
        mode=mode, seed=seed, lr=lr, batch_size=batch_size, augment=augment,
        train_size=train_size, image_size=image_size, attack_options=parse_settings(settings),
        data_dir=data_dir, device=device, force=force, progress=not json_out)
    if json_out:
        typer.echo(json.dumps(record, indent=2))
    else:
        m = record["metrics"]
        log(f"saved {out}: ACC {m['acc']:.2f}%  ASR {m['asr']:.2f}%  RA {m['ra']:.2f}%")


@app.command("eval")
@friendly_errors
def eval_cmd(
    source: Path = typer.Argument(..., metavar="RUN_DIR_OR_MODEL"),
    arch: Optional[str] = typer.Option(None, help="Architecture of a weights file."),
    model_def: Optional[str] = typer.Option(None, help="path/file.py:Class for your own model."),
    model_args: Optional[str] = typer.Option(None, help="JSON keyword arguments for --model-def."),
    weights_key: Optional[str] = typer.Option(None, help="Key of the state dict inside a .pt file."),
    input_mean: Optional[str] = INPUT_MEAN,
    input_std: Optional[str] = INPUT_STD,
    output_key: Optional[str] = OUTPUT_KEY,
    probabilities: bool = PROBABILITIES,
    dataset: Optional[str] = typer.Option(None, help="Dataset (needed with a weights file)."),
    attack_name: Optional[str] = typer.Option(None, "--attack", help="Trigger to measure ASR with "
                                              "(a run directory knows its own)."),
    target: int = typer.Option(0),
    attack_seed: int = typer.Option(0),
    settings: Optional[list[str]] = typer.Option(None, "--set", help="Attack option key=value."),
    data_dir: Optional[Path] = typer.Option(None, help=DATA_DIR_HELP),
    device: str = typer.Option("cpu"),
    per_class: bool = typer.Option(False, "--per-class", help="Also the clean accuracy of "
                                   "each class (JSON key acc_per_class)."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object."),
):
    """Measure ACC, ASR and RA of a run directory or a model file on the test split."""
    from . import data, metrics
    from .sources import open_model
    from .utils import resolve_device

    src = open_model(source, arch=arch, model_def=model_def, model_args=model_args,
                     weights_key=weights_key, dataset=dataset, data_dir=data_dir,
                     attack=attack_name, target=target, attack_seed=attack_seed,
                     attack_options=parse_settings(settings),
                     adapter=parse_adapter(input_mean, input_std, output_key, probabilities))
    ds = src.dataset
    test = data.load_dataset(ds["name"], "test", data_dir=data_dir, image_size=ds.get("image_size"))
    check_model_fits(src.model, test)
    src.model.to(resolve_device(device))
    start = time.perf_counter()
    result = metrics.evaluate(src.model, test, src.attack, per_class=per_class)
    result = {k: [None if a != a else round(a, 2) for a in v] if isinstance(v, list)
              else round(v, 4) for k, v in result.items()}  # None: a class with no test image
    if json_out:
        meta = {k: src.record.get(k) for k in ("model", "dataset", "attack", "seed") if k in src.record}
        if not src.record:
            meta = {"dataset": ds, "attack": src.attack.config() if src.attack else None}
        typer.echo(json.dumps({**result, "seconds": round(time.perf_counter() - start, 3),
                               "source": str(source), **meta}, indent=2))
    else:
        parts = [f"ACC {result['acc']:.2f}%"]
        if "asr" in result:
            parts += [f"ASR {result['asr']:.2f}%", f"RA {result['ra']:.2f}%"]
        else:
            parts.append("(no trigger known: pass --attack to measure ASR)")
        typer.echo("  ".join(parts))
        if per_class:
            names = test.classes
            typer.echo("per class: " + "  ".join(
                f"{names[c]} " + ("-" if a is None else f"{a:.1f}%")
                for c, a in enumerate(result["acc_per_class"])))


def check_model_fits(model, test) -> None:
    import torch

    with torch.no_grad():
        try:
            out = model.eval()(test.images[:2].float() / 255)
        except RuntimeError as exc:
            raise ConfigError(f"the model does not accept {test.name} images of shape "
                              f"{tuple(test.images.shape[1:])}: {str(exc).splitlines()[0]}") from None
    if not isinstance(out, torch.Tensor):
        raise ConfigError(f"the model returns a {type(out).__name__}, not a logits tensor: pass "
                          f"--output-key with the logits' index or key (e.g. --output-key 0 for "
                          f"(logits, features), --output-key logits for a dict)")
    if out.ndim != 2 or out.shape[1] != test.num_classes:
        raise ConfigError(f"num_classes mismatch: the model outputs {tuple(out.shape[1:])} logits "
                          f"but {test.name} has {test.num_classes} classes")


@app.command("repair")
@friendly_errors
def repair_cmd(
    source: Path = typer.Argument(..., metavar="RUN_DIR_OR_MODEL"),
    method: str = typer.Option(..., "--method", help="Defense (see --list-methods)."),
    out: Path = typer.Option(..., "--out", help="Output run directory (weights, mask, record)."),
    clean: Optional[int] = typer.Option(None, help="Clean training images for the defender "
                                        "(default 500)."),
    per_class: Optional[int] = typer.Option(None, help="Clean images per class instead."),
    data_free: bool = typer.Option(False, help="Give the defense no data (CLP, ShapPruning)."),
    settings: Optional[list[str]] = typer.Option(None, "--set", help="Defense option key=value."),
    seed: int = typer.Option(0),
    arch: Optional[str] = typer.Option(None, help="Architecture of a weights file."),
    model_def: Optional[str] = typer.Option(None, help="path/file.py:Class for your own model."),
    model_args: Optional[str] = typer.Option(None, help="JSON keyword arguments for --model-def."),
    weights_key: Optional[str] = typer.Option(None),
    input_mean: Optional[str] = INPUT_MEAN,
    input_std: Optional[str] = INPUT_STD,
    output_key: Optional[str] = OUTPUT_KEY,
    probabilities: bool = PROBABILITIES,
    dataset: Optional[str] = typer.Option(None, help="Dataset (needed with a weights file)."),
    attack_name: Optional[str] = typer.Option(None, "--attack", help="Trigger to measure ASR "
                                              "with (evaluation only; never given to the defense)."),
    target: int = typer.Option(0),
    no_eval: bool = typer.Option(False, help="Skip measuring ACC/ASR before and after."),
    data_dir: Optional[Path] = typer.Option(None, help=DATA_DIR_HELP),
    device: str = typer.Option("cpu"),
    threads: Optional[int] = typer.Option(None, min=1, help="Torch CPU threads (default: "
                                          "torch's). A rerun is guaranteed the same repair only "
                                          "with the same thread count; the record keeps it."),
    force: bool = typer.Option(False, help="Replace an existing output directory."),
    json_out: bool = typer.Option(False, "--json", help="Print the repair record as JSON."),
    report: bool = typer.Option(False, "--report", help="Also write report.html (trigger, "
                                "channel scores, ACC/ASR vs pruned channels) into --out."),
):
    """Repair a backdoored model; save the repaired weights, the mask and a JSON record."""
    from . import data, defenses
    from .repair_run import choose_clean, repair_and_measure, save_repair
    from .utils import resolve_device

    defenses.get(method)(**parse_settings(settings))  # unknown names and bad options fail before any work
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    if out.exists() and not force:
        raise TrojanPruneError(f"{out} already exists; choose another --out or pass --force")
    src = open_model_from_cli(source, arch, model_def, model_args, weights_key, dataset, data_dir,
                              attack_name, target,
                              adapter=parse_adapter(input_mean, input_std, output_key, probabilities))
    ds = src.dataset
    test = None
    if not no_eval:
        test = data.load_dataset(ds["name"], "test", data_dir=data_dir, image_size=ds.get("image_size"))
        check_model_fits(src.model, test)
    clean_set = choose_clean(src, clean=clean, per_class=per_class, data_free=data_free,
                             seed=seed, data_dir=data_dir)
    result, record = repair_and_measure(src, method, clean=clean_set, seed=seed,
                                        options=parse_settings(settings), test=test,
                                        device=resolve_device(device), progress=not json_out)
    if test is not None or clean_set is not None:
        example = (test.images[:1] if test is not None else clean_set.images[:1]).float() / 255
    else:  # --no-eval --data-free: no images loaded; the mask only needs the input shape
        import torch

        example = torch.zeros(1, *ds["image_shape"])
    extra = {}
    if report:
        from .report import pruning_curve, ranked_pruned, render_report

        curve = None
        if test is not None and src.attack is not None:
            curve = pruning_curve(src.model, ranked_pruned(result), test, src.attack, example,
                                  seed=seed)
        extra["report.html"] = render_report(result, record, curve=curve,
                                             title=f"{method} repair of {source.name}")
    save_repair(out, src, result, record, example, force=force, extra_files=extra)
    if json_out:
        typer.echo(json.dumps({k: v for k, v in record.items() if k != "details"}, indent=2))
    else:
        b, a = record["before"], record["after"]
        if a:
            line = f"ACC {b['acc']:.2f}% -> {a['acc']:.2f}%"
            if "asr" in a:
                line += (f"  ASR {b['asr']:.2f}% -> {a['asr']:.2f}%  RA {b['ra']:.2f}% -> "
                         f"{a['ra']:.2f}%  DER {record['der']:.2f}%")
            log(line)
        if result.verdict is not None:
            log(f"verdict: {result.verdict}" + (f", target class {result.target}"
                                                 if result.target is not None else ""))
        if result.decision:
            log(f"{method}: {result.decision}")
        log(f"{method}: pruned {record['pruned_count']} units in {record['seconds']:.1f} s "
            f"({record['evaluations']} model evaluations); saved {out}")
        if report:
            log(f"report: {out / 'report.html'}")


def open_model_from_cli(source, arch, model_def, model_args, weights_key, dataset, data_dir,
                        attack_name, target, settings=None, adapter=None):
    from .sources import open_model

    return open_model(source, arch=arch, model_def=model_def, model_args=model_args,
                      weights_key=weights_key, dataset=dataset, data_dir=data_dir,
                      attack=attack_name, target=target, attack_options=parse_settings(settings),
                      adapter=adapter)


@app.command()
@friendly_errors
def bench(
    config: Path = typer.Argument(..., metavar="CONFIG.yaml", help="The grid (see benchmarks/*.yaml)."),
    out: Path = typer.Option(..., "--out", help="Output directory: results.jsonl, models/, "
                             "tables and plots. An existing one is resumed."),
    workers: int = typer.Option(2, help="Local Ray workers (parallel cells)."),
    ray_address: Optional[str] = typer.Option(None, help="Run on an existing Ray cluster "
                                              "(HOST:PORT, ray://HOST:PORT or auto) instead."),
    data_dir: Optional[Path] = typer.Option(None, help=DATA_DIR_HELP),
    retry_failed: bool = typer.Option(False, help="Run cells recorded as failed again."),
    only: Optional[list[str]] = typer.Option(
        None, "--only", metavar="KEY=V1,V2", help="Run only the cells with these coordinates "
        "(keys: dataset, arch, attack, defense, seed; repeat for several keys), e.g. --only "
        "arch=resnet20 --only defense=onp,clp. The rest stays for a later run into the same --out."),
):
    """Run a benchmark grid (dataset x arch x attack x defense x seed) on Ray; resumable."""
    from .bench import run_bench

    if data_dir is None:
        from .data import resolve_data_dir

        data_dir = resolve_data_dir(None)
    selection: dict[str, list[str]] = {}
    for item in only or []:
        key, sep, values = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--only takes KEY=V1,V2 (e.g. arch=resnet20), got {item!r}")
        selection.setdefault(key.strip(), []).extend(v.strip() for v in values.split(",") if v.strip())
    summary = run_bench(config, out, workers=workers, address=ray_address, data_dir=data_dir,
                        retry_failed=retry_failed, only=selection)
    if summary["failed"]:
        log(f"[yellow]{summary['failed']} cell(s) failed; see the 'error' field in "
            f"{summary['results']}[/yellow]")


@app.command()
@friendly_errors
def demo(
    seed: int = typer.Option(0),
    epochs: int = typer.Option(30, help="Training epochs for the demo model."),
):
    """Train a small BadNets-backdoored model on an embedded dataset and repair it."""
    from .demo import run_demo

    run_demo(seed=seed, epochs=epochs)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
