"""What a comparison leaves in its output folder besides the runs: results.json, results.md,
three PNG plots and report.html (self-contained: the plots are embedded as data URIs, no
script, no stylesheet or font from the network)."""
from __future__ import annotations

import base64
import html
import os

from ..training.reporting import write_json
from . import results as res

PLOTS = {"accuracy_vs_params.png": "Accuracy vs trainable parameters",
         "accuracy_vs_step_time.png": "Accuracy vs step time",
         "loss_curves.png": "Training loss of every run"}
LOSS_PLOTS = {"loss_vs_params.png": "Held-out loss vs trainable parameters",
              "loss_vs_step_time.png": "Held-out loss vs step time",
              "loss_curves.png": "Training loss of every run"}


def plot_titles(results: dict) -> dict:
    return LOSS_PLOTS if results.get("metric") == "loss" else PLOTS
STYLE = ("body{font-family:sans-serif;margin:2em;max-width:1100px}table{border-collapse:collapse;"
         "margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}"
         "td:first-child,th:first-child{text-align:left}img{max-width:100%;display:block;"
         "margin:1em 0}code{background:#f4f4f4;padding:2px 4px}")


def write_plots(out_dir: str, results: dict) -> dict:
    """The three PNGs; a plotting problem is recorded, never loses the results."""
    from .. import plotting
    v, made = results["variants"], {}
    y = "loss" if results.get("metric") == "loss" else "accuracy"
    makers = {
        f"{y}_vs_params.png": lambda p: plotting.evaluation_scatter(
            v, "trainable_params", p, "trainable parameters (log scale)", y, log_x=True),
        f"{y}_vs_step_time.png": lambda p: plotting.evaluation_scatter(
            v, "step_time_s", p, "median optimizer step time (s)", y),
        "loss_curves.png": lambda p: plotting.loss_curves(results["runs"], p)}
    for name, make in makers.items():
        path = os.path.join(out_dir, name)
        try:
            made[name] = make(path)
        except Exception as e:
            made[name + ".error"] = f"{type(e).__name__}: {e}"
    return made


def html_table(header, rows) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>"
                   for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _run_cells(before: dict, after: dict) -> tuple:
    if before.get("metric") == "loss" or after.get("metric") == "loss":
        return tuple(res.loss_cell({"mean": e["loss"], "n": 1}) if e.get("loss") is not None else "-"
                     for e in (before, after))
    return (res.accuracy_cell({"mean": before.get("accuracy"), "n": 1}) if before else "-",
            res.accuracy_cell({"mean": after.get("accuracy"), "n": 1}, after.get("ci95"))
            if after else "-")


def run_rows(results: dict) -> list[tuple]:
    rows = []
    for r in results["runs"]:
        load = r.get("load_average_1min") or {}
        rows.append((r["variant"], r["seed"], r["status"], r["fingerprint"],
                     *_run_cells(r["before"] or {}, r["after"] or {}),
                     "-" if r["train_s"] is None else f"{r['train_s']:.1f}",
                     "-" if load.get("mean") is None else f"{load['mean']:.2f}"))
    return rows


def data_uri(path: str) -> str:
    with open(path, "rb") as f:
        return "data:image/png;base64," + base64.b64encode(f.read()).decode("ascii")


def report_html(out_dir: str, results: dict, plots: dict) -> str:
    parts = [f"<h1>lora-lite compare</h1><p><code>{html.escape(results['command'])}</code></p>",
             f"<p>{html.escape(res.machine_line(results))}</p>",
             html_table(res.table_header(results), res.table_rows(results["variants"]))]
    for name, title in plot_titles(results).items():
        if name in plots:
            parts.append(f"<h2>{html.escape(title)}</h2><img alt=\"{html.escape(title)}\" "
                         f"src=\"{data_uri(plots[name])}\">")
    evaluation = (("held-out loss before", "held-out loss after") if results.get("metric") == "loss"
                  else ("accuracy before %", "accuracy after % (95% CI)"))
    parts.append("<h2>Runs</h2>" + html_table(
        ("variant", "seed", "status", "fingerprint", *evaluation, "train time s", "load average"),
        run_rows(results)))
    return ("<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>lora-lite compare</title>"
            f"<style>{STYLE}</style></head><body>{''.join(parts)}</body></html>\n")


def write_all(out_dir: str, results: dict) -> dict:
    """results.json, results.md, the plots and report.html; the paths written."""
    plots = write_plots(out_dir, results)
    results["files"] = {"plots": plots}
    write_json(os.path.join(out_dir, "results.json"), results)
    md_path = os.path.join(out_dir, "results.md")
    with open(md_path, "w", encoding="utf-8") as f:
        f.write(res.markdown(results))
    html_path = os.path.join(out_dir, "report.html")
    with open(html_path, "w", encoding="utf-8") as f:
        f.write(report_html(out_dir, results, {k: v for k, v in plots.items()
                                               if not k.endswith(".error")}))
    return {"results.json": os.path.join(out_dir, "results.json"), "results.md": md_path,
            "report.html": html_path, **plots}
