"""The loss-curve PNG of a training run (matplotlib, Agg backend: no display needed)."""
from __future__ import annotations


def loss_curve(losses, lrs, path, title=""):
    """Per-step training loss (and its running mean) with the learning rate on a second axis."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = list(range(1, len(losses) + 1))
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    ax.plot(steps, losses, color="tab:blue", alpha=0.35, linewidth=1, label="loss per step")
    window = max(1, len(losses) // 10)
    smooth = [sum(losses[max(0, i - window + 1):i + 1]) / len(losses[max(0, i - window + 1):i + 1])
              for i in range(len(losses))]
    ax.plot(steps, smooth, color="tab:blue", linewidth=2, label=f"running mean ({window} steps)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (mean per supervised token)")
    if lrs:
        ax2 = ax.twinx()
        ax2.plot(steps[:len(lrs)], lrs, color="tab:orange", linewidth=1, label="learning rate")
        ax2.set_ylabel("learning rate", color="tab:orange")
        ax2.tick_params(axis="y", colors="tab:orange")
    ax.legend(loc="upper right", fontsize=8)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


# -- lora-lite compare: one chart over all variants -----------------------------------------------
def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


SCATTER_Y = {  # what a compare scatter plots on y: summary keys, scale to the axis, label
    "accuracy": ("accuracy_after", "accuracy_before", 100, "accuracy after training (%)"),
    "loss": ("loss_after", "loss_before", 1, "held-out loss after training (lower is better)"),
}


def evaluation_scatter(summaries, x_key, path, xlabel, y="accuracy", log_x=False, title=""):
    """Each variant's adapted accuracy or held-out loss (mean over seeds, bar = spread) against
    ``x_key``, with the base model's as a dashed line."""
    after_key, before_key, scale, ylabel = SCATTER_Y[y]
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    for v in summaries:
        x, after = v.get(x_key), v.get(after_key)
        if not x or not after:
            continue
        ax.errorbar([x], [scale * after["mean"]], yerr=[scale * after["std"]], fmt="o", capsize=3,
                    markersize=7)
        ax.annotate(v["variant"], (x, scale * after["mean"]), textcoords="offset points",
                    xytext=(5, 4), fontsize=8)
    befores = [v[before_key]["mean"] for v in summaries if v.get(before_key)]
    if befores:
        ax.axhline(scale * befores[0], color="gray", linestyle="--", linewidth=1, label="base model")
        ax.legend(loc="best", fontsize=8)
    if log_x:
        from matplotlib.ticker import NullFormatter
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def loss_curves(runs, path, title=""):
    """The training loss per step of every run on one chart (one colour per variant)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    colours, labelled = {}, set()
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for r in runs:
        if not r.get("losses"):
            continue
        colour = colours.setdefault(r["variant"], cycle[len(colours) % len(cycle)])
        label = None if r["variant"] in labelled else r["variant"]
        labelled.add(r["variant"])
        ax.plot(range(1, len(r["losses"]) + 1), r["losses"], color=colour, linewidth=1.4,
                alpha=0.85, label=label)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (mean per supervised token)")
    ax.set_title(title, fontsize=9)
    if labelled:
        ax.legend(fontsize=8, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
