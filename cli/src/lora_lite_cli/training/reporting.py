"""What a run tells the user and leaves on disk: progress callbacks, metrics.json,
predictions.jsonl and loss.png (only rank 0 writes files)."""
from __future__ import annotations

import json
import os


class Reporter:
    """What the loop tells the user; the CLI passes one that draws rich progress bars."""

    def status(self, text):
        pass

    def start_train(self, steps, done):
        pass

    def step(self, step, loss, lr, tokens_per_s):
        pass

    def end_train(self):
        pass

    def start_eval(self, label, n):
        pass

    def eval_advance(self, k):
        pass

    def end_eval(self):
        pass


def eval_summary(result):
    if result is None:
        return None
    keys = ("loss", "perplexity", "tokens") if result.get("metric") == "loss" else (
        "accuracy", "correct")
    return {k: result.get(k) for k in ("metric", *keys, "n", "time_s")}


def plot_title(s, metrics):
    before, after = metrics.get("accuracy_before"), metrics.get("accuracy_after")
    acc = ""
    if before is not None and after is not None:
        acc = f"  accuracy {before:.1%} -> {after:.1%}"
    return f"{s.variant} on {os.path.basename(s.model)}, lr {s.lr:g}, r {s.rank}{acc}"


def write_predictions(path, base_eval, adapted_eval):
    base = {p["index"]: p for p in (base_eval or {}).get("predictions", [])}
    adapted = {p["index"]: p for p in (adapted_eval or {}).get("predictions", [])}
    with open(path, "w", encoding="utf-8") as f:
        for i in sorted(set(base) | set(adapted)):
            row = base.get(i) or adapted.get(i)
            rec = {"index": i, "question": row["question"], "reference": row["reference"]}
            for label, src in (("base", base), ("adapted", adapted)):
                if i in src:
                    rec[label] = {"output": src[i]["output"], "prediction": src[i]["prediction"],
                                  "correct": src[i]["correct"]}
            f.write(json.dumps(rec) + "\n")


def write_json(path, obj):
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, default=str)
    os.replace(tmp, path)


def write_run_files(out_dir, s, metrics, losses, lrs, base_eval, adapted_eval):
    """predictions.jsonl, loss.png (a plotting problem never loses the run), metrics.json."""
    if base_eval or adapted_eval:
        pred_path = os.path.join(out_dir, "predictions.jsonl")
        write_predictions(pred_path, base_eval, adapted_eval)
        metrics["files"]["predictions"] = pred_path
    try:
        from ..plotting import loss_curve
        png = os.path.join(out_dir, "loss.png")
        loss_curve(losses, lrs, png, title=plot_title(s, metrics))
        metrics["files"]["loss_curve"] = png
    except Exception as e:
        metrics["files"]["loss_curve_error"] = f"{type(e).__name__}: {e}"
    write_json(os.path.join(out_dir, "metrics.json"), metrics)


def train_metrics(state, outcome, probe_before, probe_after) -> dict:
    losses, train_s = state.losses, state.train_s
    tokens = state.sanity["train_tokens"]
    return {
        "steps_done": state.step, "losses": losses, "lrs": state.lrs,
        "adapter_kept_from_step": outcome.kept_step,
        "loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses else None,
        "probe_loss_before": probe_before, "probe_loss_after": probe_after,
        "supervised_tokens": tokens, "step_times_s": state.step_times,
        "supervised_tokens_per_s": tokens / train_s if train_s else None,
    }
