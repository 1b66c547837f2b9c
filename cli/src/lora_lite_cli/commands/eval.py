"""``lora-lite eval``: accuracy of a base model and of the same model with an adapter file, or
with each of several (``--adapter A --adapter B``: one base load, each attached under a name) and
a weighted set of them (``--mix A=1,B=0.5``, names = the adapters' file stems)."""
from __future__ import annotations

import time
from pathlib import Path

import typer

from ..adapters import check_adapter, model_of_adapter
from ..app import app, console, err_console, handle_errors
from ..errors import CLIError
from ..options import dtype_option, json_option, quantize_option, threads_option
from ..output import print_json
from ..training.reporting import eval_summary as summary


@app.command("eval")
@handle_errors
def eval_command(
    adapter: list[Path] = typer.Option(
        ..., "--adapter", "-a",
        help="Repeatable. Adapter file (.safetensors written by lora-lite), a PEFT adapter folder, or a hub adapter id "
        "(org/name: its config and safetensors weights only, through huggingface_hub).",
    ),
    model: str | None = typer.Option(
        None, "--model", "-m",
        help="Base model (default: the one recorded in the adapter file, else the embedded smollm2).",
    ),
    eval_data: str = typer.Option(
        "generated", "--eval-data",
        help="'generated' (the fixed held-out split), a .jsonl file, a dataset folder or a hub dataset, e.g. "
        "openai/gsm8k.",
    ),
    limit: int = typer.Option(
        100, "--eval-limit", "--limit", "-n",
        help="Evaluate the first N items (0: all); the same option as train's --eval-limit.",
    ),
    max_new_tokens: int = typer.Option(32, "--max-new-tokens", help="Generation budget per answer."),
    metric: str | None = typer.Option(
        None, "--metric",
        help="numeric (the answer's number), exact (the completion, stripped) or loss (held-out loss and perplexity on "
        "the completion tokens) (default: numeric for question/answer data, else loss).",
    ),
    data_format: str | None = typer.Option(
        None, "--data-format",
        help="qa, chat, alpaca, prompt_completion or text (default: detected from the fields).",
    ),
    seq_len: int = typer.Option(256, "--seq-len", help="Truncate examples to this many tokens for --metric loss."),
    batch_size: int = typer.Option(
        50, "--eval-batch-size", "--batch-size", "-b",
        help="Prompts per generation batch (train's --eval-batch-size).",
    ),
    dtype: str = dtype_option(),
    quantize: str | None = quantize_option(),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda or auto."),
    threads: int | None = threads_option(),
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
):
    """Accuracy (or held-out loss) of the base model and of the adapted model on held-out data.

    --metric numeric (question/answer data's default): greedy generation, scored as GSM8K: the
    last number after the last '####', else the last number of the answer. exact: the stripped
    completion equals the reference. loss: the loss and perplexity on the completion tokens. Per-item predictions
    (output, extracted answer, correct) go to a JSONL file.
    """
    import lora_lite as ll

    from .. import data as data_mod
    from .. import evaluate as eval_mod
    from ..models import load_model
    from ..training import pick_device, set_threads
    from ..training.reporting import write_predictions

    if quantize not in (None, "4bit", "8bit"):
        raise CLIError(f"--quantize {quantize!r}: expected 4bit or 8bit", 2)
    adapters, mix_set = _checked(adapter, mix)  # bad adapters / --mix fail before a model loads
    adapter = adapters[0]
    name = model or model_of_adapter(str(adapter))
    out = err_console if as_json else console
    try:
        examples = data_mod.eval_data(eval_data, limit or None, data_format, metric)
        metric = data_mod.check_metric(metric, examples.format)
    except data_mod.DataError as e:
        raise CLIError(str(e), 2) from None
    if metric == "loss" and len(adapters) > 1:
        raise CLIError("--metric loss scores one --adapter at a time for now; run eval per adapter", 2)
    device = pick_device(device)
    set_threads(threads)
    with out.status(f"loading {name} ..."):
        base_model, tokenizer = load_model(name, dtype, quantize, device)

    def run(label):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
        with Progress(TextColumn(f"[bold]eval {label}"), BarColumn(), MofNCompleteColumn(),
                      TimeRemainingColumn(), console=out) as progress:
            task = progress.add_task(label, total=len(examples.examples))
            t = time.perf_counter()
            res = eval_mod.evaluate(base_model, tokenizer, examples.examples, batch_size,
                                    max_new_tokens, lambda k: progress.advance(task, k),
                                    metric=metric, seq_len=seq_len)
        res["time_s"] = round(time.perf_counter() - t, 2)
        return res

    base_res = run("base model") if base else None
    if len(adapters) > 1:
        result = _several(ll, base_model, adapters, mix_set, run, base_res, name, examples)
        return print_json(result) if as_json else _show_several(result)
    ll.load(base_model, adapter)
    adapted_res = run("adapted model")
    pred_path = str(predictions or _predictions_path(adapter))
    write_predictions(pred_path, base_res, adapted_res)

    key = "loss" if metric == "loss" else "accuracy"
    meta = {"variant": ll.attached(base_model).cfg.variant}
    result = {"adapter": str(adapter), "variant": meta.get("variant"), "model": name,
              "eval_data": examples.fingerprint(), "max_new_tokens": max_new_tokens,
              "base": summary(base_res), "adapted": summary(adapted_res),
              "metric": metric,
              "gain": (adapted_res[key] - base_res[key]) if base_res else None,
              "predictions": pred_path}
    if as_json:
        print_json(result)
        return
    from rich.table import Table
    table = Table(title=f"{meta.get('variant')} adapter {adapter} on {name}", title_justify="left")
    table.add_column("model")
    loss = metric == "loss"
    table.add_column("held-out loss" if loss else f"accuracy ({metric})", justify="right")
    table.add_column("perplexity" if loss else "correct", justify="right")
    for label, res in (("base", base_res), ("adapted", adapted_res)):
        if res is not None and loss:
            table.add_row(label, f"{res['loss']:.4f}", f"{res['perplexity']:.4g}")
        elif res is not None:
            table.add_row(label, f"{100 * res['accuracy']:.1f}%", f"{res['correct']}/{res['n']}")
    console.print(table)
    console.print(f"data: {examples.spec} ({examples.kind}, {len(examples.examples)} items); "
                  f"predictions: {pred_path}", highlight=False)


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
