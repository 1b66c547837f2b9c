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
