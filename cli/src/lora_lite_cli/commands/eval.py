"""``lora-lite eval``: accuracy of a base model and of the same model with an adapter file, or
with each of several (``--adapter A --adapter B``: one base load, each attached under a name) and
a weighted set of them (``--mix A=1,B=0.5``, names = the adapters' file stems).

The flags eval shares with ``train`` (model, data, metric, limits, dtype, quantize, device,
threads) are generated from the ``Settings`` fields, declared once (``settings_options``)."""
from __future__ import annotations

import time
from pathlib import Path

import typer

from ..adapters import check_adapter, model_of_adapter
from ..app import app, console, err_console, handle_errors
from ..errors import CLIError
from ..options import check_quantize, json_option, model_option
from ..output import print_json
from ..training.reporting import eval_summary as summary
from .settings_options import shared_settings_options, with_defaults

# train's flags that eval takes too, with eval's own wording where it differs
SHARED = ("model", "eval_data", "data_format", "metric", "seq_len", "dtype", "quantize", "eval_limit",
          "eval_batch_size", "max_new_tokens", "device", "threads")
OVERRIDES = {
    "model": {"option": lambda: model_option(help_extra=" (default: the model recorded in the adapter file, "
                                                        "else smollm2)")},
    "eval_limit": {"aliases": ("--limit", "-n"), "help": "Evaluate the first N items, 0 for all"},
    "eval_batch_size": {"aliases": ("--batch-size", "-b")},
    "seq_len": {"help": "Truncate examples to this many tokens for --metric loss"},
}


@app.command("eval")
@handle_errors
@shared_settings_options(SHARED, OVERRIDES)
def eval_command(
    adapter: list[Path] = typer.Option(
        ..., "--adapter", "-a",
        help="Repeatable. Adapter file (.safetensors written by lora-lite), a PEFT adapter folder, or a hub adapter id "
        "(org/name: its config and safetensors weights only, through huggingface_hub).",
    ),
    base: bool = typer.Option(True, "--base/--no-base", help="Also evaluate the base model."),
    predictions: Path | None = typer.Option(
        None, "--predictions",
        help="Where to write per-item predictions (default: eval_predictions.jsonl next to the adapter).",
    ),
    mix: str | None = typer.Option(
        None, "--mix",
        help="With several --adapter: also score this weighted set, e.g. A=1,B=0.5 (A, B: the adapters' file stems).",
    ),
    as_json: bool = json_option(),
    given: dict | None = None,
):
    """Accuracy (or held-out loss) of the base model and of the adapted model on held-out data.

    --metric numeric (question/answer data's default): greedy generation, scored as GSM8K: the
    last number after the last '####', else the last number of the answer. exact: the stripped
    completion equals the reference. loss: the loss and perplexity on the completion tokens. Per-item predictions
    (output, extracted answer, correct) go to a JSONL file.
    """
    import lora_lite as ll

    opts = with_defaults(given or {}, keep_none=("model",))
    check_quantize(opts["quantize"])
    adapters, mix_set = _checked(adapter, mix)  # bad adapters / --mix fail before a model loads
    opts["model"] = opts["model"] or model_of_adapter(str(adapters[0]))
    out = err_console if as_json else console
    examples, opts["metric"] = _examples(opts)
    if opts["metric"] == "loss" and len(adapters) > 1:
        raise CLIError("--metric loss scores one --adapter at a time for now; run eval per adapter", 2)
    run = _Scorer(opts, examples, out)
    base_res = run("base model") if base else None
    if len(adapters) > 1:
        result = _several(ll, run.model, adapters, mix_set, run, base_res, opts["model"], examples)
        return print_json(result) if as_json else _show_several(result)
    ll.load(run.model, adapters[0])
    result = _one(ll, run, adapters[0], base_res, predictions, opts, examples)
    if as_json:
        return print_json(result)
    _show_one(result, examples)


def _examples(opts):
    """(the evaluation data, the metric it is scored with); a data problem is one line, exit 2."""
    from .. import data as data_mod
    try:
        examples = data_mod.eval_data(opts["eval_data"], opts["eval_limit"] or None, opts["data_format"],
                                      opts["metric"])
        return examples, data_mod.check_metric(opts["metric"], examples.format)
    except data_mod.DataError as e:
        raise CLIError(str(e), 2) from None


class _Scorer:
    """Loads the base model once; ``run(label)`` scores the model as it is now, with a progress bar."""

    def __init__(self, opts, examples, out):
        from ..models import load_model
        from ..training import pick_device, set_threads
        self.opts, self.examples, self.out = opts, examples, out
        device = pick_device(opts["device"])
        set_threads(opts["threads"])
        with out.status(f"loading {opts['model']} ..."):
            self.model, self.tokenizer = load_model(opts["model"], opts["dtype"], opts["quantize"], device)

    def __call__(self, label) -> dict:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        from .. import evaluate as eval_mod
        o, items = self.opts, self.examples.examples
        with Progress(TextColumn(f"[bold]eval {label}"), BarColumn(), MofNCompleteColumn(),
                      TimeRemainingColumn(), console=self.out) as progress:
            task = progress.add_task(label, total=len(items))
            t = time.perf_counter()
            res = eval_mod.evaluate(self.model, self.tokenizer, items, o["eval_batch_size"], o["max_new_tokens"],
                                    lambda k: progress.advance(task, k), metric=o["metric"], seq_len=o["seq_len"])
        res["time_s"] = round(time.perf_counter() - t, 2)
        return res


def _one(ll, run, adapter, base_res, predictions, opts, examples) -> dict:
    """Scores the attached adapter, writes the per-item predictions: the result record."""
    from ..training.reporting import write_predictions
    adapted_res = run("adapted model")
    pred_path = str(predictions or _predictions_path(adapter))
    write_predictions(pred_path, base_res, adapted_res)
    key = "loss" if opts["metric"] == "loss" else "accuracy"
    return {"adapter": str(adapter), "variant": ll.attached(run.model).cfg.variant, "model": opts["model"],
            "eval_data": examples.fingerprint(), "max_new_tokens": opts["max_new_tokens"],
            "base": summary(base_res), "adapted": summary(adapted_res), "metric": opts["metric"],
            "gain": (adapted_res[key] - base_res[key]) if base_res else None, "predictions": pred_path}


def _show_one(result, examples):
    from rich.table import Table
    metric, loss = result["metric"], result["metric"] == "loss"
    table = Table(title=f"{result['variant']} adapter {result['adapter']} on {result['model']}",
                  title_justify="left")
    table.add_column("model")
    table.add_column("held-out loss" if loss else f"accuracy ({metric})", justify="right")
    table.add_column("perplexity" if loss else "correct", justify="right")
    for label in ("base", "adapted"):
        res = result[label]
        if res is not None and loss:
            table.add_row(label, f"{res['loss']:.4f}", f"{res['perplexity']:.4g}")
        elif res is not None:
            table.add_row(label, f"{100 * res['accuracy']:.1f}%", f"{res['correct']}/{res['n']}")
    console.print(table)
    console.print(f"data: {examples.spec} ({examples.kind}, {len(examples.examples)} items); "
                  f"predictions: {result['predictions']}", highlight=False)


def _predictions_path(adapter) -> Path:
    """eval_predictions.jsonl next to a local adapter (file or folder); in the working directory
    for a hub adapter id (its "org/" is no local folder)."""
    if Path(adapter).exists():
        return Path(adapter).with_name("eval_predictions.jsonl")
    return Path("eval_predictions.jsonl")


def _checked(adapters, mix):
    """The --adapter list, each checked (missing / foreign / truncated / refused), and --mix."""
    adapters = list(adapters)
    for path in adapters:
        check_adapter(path)
    return adapters, _mix(mix, adapters)


def _stem(path) -> str:
    return Path(path).name.removesuffix(".safetensors")


def _mix(text, adapters):
    """{adapter index: weight} of ``--mix A=1,B=0.5``, checked before any model loads."""
    if text is None:
        return None
    import math
    stems = [_stem(p) for p in adapters]
    if len(adapters) < 2 or len(set(stems)) != len(stems):
        raise CLIError("--mix needs two or more --adapter files with distinct names", 2)
    out = {}
    for part in text.split(","):
        key, _, value = part.partition("=")
        try:
            weight = float(value)
        except ValueError:
            weight = math.nan
        if key not in stems or not math.isfinite(weight) or stems.index(key) in out:
            raise CLIError(f"--mix {text!r}: give NAME=WEIGHT pairs, NAME among {', '.join(stems)}, "
                           "each once, with finite weights", 2)
        out[stems.index(key)] = weight
    return out


def _several(ll, model, adapters, mix_set, run, base_res, name, examples) -> dict:
    """Each adapter scored alone (and the --mix set), all on one loaded base."""
    labels = [f"a{i}" for i in range(len(adapters))]
    for label, path in zip(labels, adapters, strict=True):
        ll.load(model, path, name=label)
    rows = []

    def score(title, names, weights, path=None):
        with ll.using(model, names, weights):
            res = run(title)
        if path is not None:
            from ..training.reporting import write_predictions
            write_predictions(str(_predictions_path(path).with_name(
                f"eval_predictions.{_stem(path)}.jsonl")), base_res, res)
        rows.append({"adapter": title, "variant": ll.attached(model, names[0]).cfg.variant,
                     **summary(res),
                     "gain": res["accuracy"] - base_res["accuracy"] if base_res else None})
    for label, path in zip(labels, adapters, strict=True):
        score(str(path), [label], None, path)
    if mix_set:
        title = "mix " + ",".join(f"{_stem(adapters[i])}={w:g}" for i, w in mix_set.items())
        score(title, [labels[i] for i in mix_set], list(mix_set.values()))
    return {"model": name, "eval_data": examples.fingerprint(), "base": summary(base_res),
            "adapters": rows}


def _show_several(result):
    from rich.table import Table
    table = Table(title=f"{len(result['adapters'])} adapters on {result['model']}", title_justify="left")
    for column in ("model", "accuracy", "correct"):
        table.add_column(column, justify="left" if column == "model" else "right")
    for row in ([{"adapter": "base", **result["base"]}] if result["base"] else []) + result["adapters"]:
        table.add_row(row["adapter"], f"{100 * row['accuracy']:.1f}%", f"{row['correct']}/{row['n']}")
    console.print(table)
