"""The comparison's figures: per run (one variant, one seed) and per variant (over the seeds),
from the stored result files; written as results.json and results.md. The evaluation is an
accuracy (numeric or exact match, with a Wilson interval) or, with ``--metric loss``, the
held-out loss and perplexity."""
from __future__ import annotations

import json
import math
import os
import statistics

from .plan import Job

Z95 = 1.959964


def wilson(correct: int, n: int, z: float = Z95) -> tuple[float, float] | None:
    """The Wilson score interval of a proportion (95% by default)."""
    if not n:
        return None
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def _evaluation(summary: dict | None) -> dict | None:
    """One evaluation as compare keeps it: loss and perplexity, or accuracy with its interval."""
    if summary and summary.get("metric") == "loss":
        if summary.get("loss") is None:
            return None
        return {"metric": "loss", "loss": summary["loss"], "perplexity": summary.get("perplexity"),
                "tokens": summary.get("tokens"), "n": summary.get("n")}
    if not summary or summary.get("accuracy") is None:
        return None
    ci = wilson(summary.get("correct", 0), summary.get("n", 0))
    return {"accuracy": summary["accuracy"], "correct": summary.get("correct"),
            "n": summary.get("n"), "ci95": list(ci) if ci else None}


def run_record(job: Job, stored: dict) -> dict:
    m = stored.get("metrics", {})
    train, ev = m.get("train", {}), m.get("eval", {})
    steps = train.get("step_times_s") or []
    return {
        "variant": job.variant, "seed": job.seed, "fingerprint": job.fingerprint,
        "status": stored.get("status"), "message": stored.get("message") or None,
        "config": m.get("adapter", {}).get("config"), "settings": m.get("settings"),
        "trainable_params": m.get("adapter", {}).get("trainable_params"),
        "adapter_bytes": stored.get("adapter_bytes"),
        "metric": m.get("metric"),
        "before": _evaluation(ev.get("base")), "after": _evaluation(ev.get("adapted")),
        "base_shared": stored.get("base_shared"), "losses": train.get("losses", []),
        "train_s": m.get("time", {}).get("train_s"),
        "step_time_s": statistics.median(steps) if steps else None,
        "peak_rss_mb": m.get("memory", {}).get("peak_rss_mb"),
        "peak_cuda_mb": m.get("memory", {}).get("peak_cuda_mb"),
        "host": stored.get("host"), "load_average_1min": stored.get("load_average_1min"),
        "finished_at": stored.get("finished_at"), "result_file": job.result_path,
    }


def load_runs(jobs: list[Job]) -> list[dict]:
    runs = []
    for job in jobs:
        if os.path.exists(job.result_path):
            with open(job.result_path, encoding="utf-8") as f:
                runs.append(run_record(job, json.load(f)))
    return runs


def _spread(values):
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1
            else 0.0, "min": min(values), "max": max(values), "n": len(values)}


def variant_summary(variant: str, runs: list[dict]) -> dict:
    """Mean and spread over the seeds; the 95% interval pools every seed's answers."""
    after = [r["after"] for r in runs if r["after"] and "accuracy" in r["after"]]
    correct, n = sum(a["correct"] or 0 for a in after), sum(a["n"] or 0 for a in after)
    ci = wilson(correct, n)

    def spread(side, key):
        return _spread([r[side][key] for r in runs if r[side] and key in r[side]])
    steps = [r["step_time_s"] for r in runs if r["step_time_s"] is not None]
    first = runs[0]
    return {
        "variant": variant, "seeds": [r["seed"] for r in runs],
        "statuses": sorted({r["status"] for r in runs}),
        "trainable_params": first["trainable_params"], "adapter_bytes": first["adapter_bytes"],
        "config": first["config"], "lr": (first["settings"] or {}).get("lr"),
        "targets": (first["settings"] or {}).get("targets"),
        "metric": first.get("metric"),
        "accuracy_before": spread("before", "accuracy"), "accuracy_after": spread("after", "accuracy"),
        "accuracy_after_pooled_ci95": list(ci) if ci else None,
        "loss_before": spread("before", "loss"), "loss_after": spread("after", "loss"),
        "perplexity_after": spread("after", "perplexity"),
        "step_time_s": statistics.median(steps) if steps else None,
        "train_s": _spread([r["train_s"] for r in runs]),
        "peak_rss_mb": max((r["peak_rss_mb"] or 0 for r in runs), default=None),
        "peak_cuda_mb": max((r["peak_cuda_mb"] or 0 for r in runs), default=None) or None,
        "load_average_1min_mean": _spread([(r["load_average_1min"] or {}).get("mean")
                                           for r in runs]),
    }


def summarise(jobs: list[Job], runs: list[dict]) -> list[dict]:
    order = list(dict.fromkeys(j.variant for j in jobs))
    return [variant_summary(v, [r for r in runs if r["variant"] == v]) for v in order
            if any(r["variant"] == v for r in runs)]


def _pct(x):
    return "-" if x is None else f"{100 * x:.1f}"


def accuracy_cell(spread, ci=None) -> str:
    if not spread:
        return "-"
    text = _pct(spread["mean"])
    if spread["n"] > 1:
        text += f" ± {_pct(spread['std'])}"
    if ci:
        text += f" [{_pct(ci[0])}, {_pct(ci[1])}]"
    return text


def loss_cell(spread) -> str:
    if not spread:
        return "-"
    return f"{spread['mean']:.4f}" + (f" ± {spread['std']:.4f}" if spread["n"] > 1 else "")


SETUP_HEADER = ("variant", "lr", "targets", "trainable params", "adapter KB")
COST_HEADER = ("step time s", "train time s", "peak memory MB")
TABLE_HEADER = (*SETUP_HEADER, "accuracy before %", "accuracy after % (95% CI)", "gain (points)",
                *COST_HEADER)
LOSS_TABLE_HEADER = (*SETUP_HEADER, "held-out loss before", "held-out loss after", "change",
                     "perplexity after", *COST_HEADER)


def table_header(results: dict) -> tuple:
    return LOSS_TABLE_HEADER if results.get("metric") == "loss" else TABLE_HEADER


def _evaluation_cells(v: dict) -> tuple:
    if v.get("metric") == "loss":
        before, after = v["loss_before"], v["loss_after"]
        change = (after["mean"] - before["mean"]) if before and after else None
        ppl = v["perplexity_after"]
        return (loss_cell(before), loss_cell(after), "-" if change is None else f"{change:+.4f}",
                "-" if not ppl else f"{ppl['mean']:.3f}")
    before, after = v["accuracy_before"], v["accuracy_after"]
    gain = (after["mean"] - before["mean"]) if before and after else None
    return (accuracy_cell(before), accuracy_cell(after, v["accuracy_after_pooled_ci95"]),
            "-" if gain is None else f"{100 * gain:+.1f}")


def table_rows(summaries: list[dict]) -> list[tuple]:
    rows = []
    for v in summaries:
        mem = v["peak_cuda_mb"] or v["peak_rss_mb"]
        targets = ", ".join(v["targets"] or ()) or "(the variant's own)"
        rows.append((v["variant"], "-" if v["lr"] is None else f"{v['lr']:g}",
                     targets,
                     f"{v['trainable_params']:,}" if v["trainable_params"] else "-",
                     f"{v['adapter_bytes'] / 1024:,.1f}" if v["adapter_bytes"] else "-",
                     *_evaluation_cells(v),
                     "-" if v["step_time_s"] is None else f"{v['step_time_s']:.3f}",
                     "-" if not v["train_s"] else f"{v['train_s']['mean']:.1f}",
                     "-" if not mem else f"{mem:,.0f}"))
    return rows


def markdown(results: dict) -> str:
    """The table as Markdown, with the command and the machine's load above it."""
    lines = [f"`{results['command']}`", "", machine_line(results), "",
             "| " + " | ".join(table_header(results)) + " |",
             "|" + "|".join("---" for _ in table_header(results)) + "|"]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |"
              for row in table_rows(results["variants"])]
    return "\n".join(lines) + "\n"


def machine_line(results: dict) -> str:
    loads = [r["load_average_1min"]["mean"] for r in results["runs"]
             if r.get("load_average_1min")]
    host = next((r["host"] for r in results["runs"] if r.get("host")), {}) or {}
    load = (f"1-minute load average during the runs {min(loads):.1f}-{max(loads):.1f}"
            if loads else "load average not recorded")
    seeds = sorted({r["seed"] for r in results["runs"]})
    return (f"{host.get('node', '?')}: {host.get('cpus', '?')} CPUs{', ' + host['gpu'] if host.get('gpu') else ''}, "
            f"{load}; seeds {', '.join(map(str, seeds))}; torch "
            f"{host.get('versions', {}).get('torch', '?')}, lora-lite "
            f"{host.get('versions', {}).get('lora_lite', '?')}")


def build(command: str, jobs: list[Job], outcome) -> dict:
    runs = load_runs(jobs)
    metric = next((r["metric"] for r in runs if r.get("metric")), None)
    return {"command": command, "metric": metric, "variants": summarise(jobs, runs), "runs": runs,
            "sweep": {"ran": outcome.ran, "skipped": outcome.skipped, "failed": outcome.failed,
                      "interrupted": outcome.interrupted, "planned": [j.name for j in jobs]}}
