"""PNG curves of a run's metrics (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path

MAIN_CURVES = (("reward", "reward"), ("accuracy", "train accuracy"), ("format_rate", "format rate"),
               ("kl", "KL to reference"), ("response_length", "response length"),
               ("entropy", "entropy"), ("clip_frac", "clip fraction"), ("grad_norm", "grad norm"))


def plot_metrics(rows: list[dict], path: Path, title: str = "", evals: list[dict] | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = [(k, name) for k, name in MAIN_CURVES if any(k in r for r in rows)]
    cols = 4
    nrows = max(1, -(-len(curves) // cols))
    fig, axes = plt.subplots(nrows, cols, figsize=(4 * cols, 3 * nrows), squeeze=False)
    for ax, (key, name) in zip(axes.flat, curves):
        xs = [r["step"] for r in rows if key in r]
        ax.plot(xs, [r[key] for r in rows if key in r], lw=1.2)
        if key == "accuracy" and evals:
            ax.plot([e["step"] for e in evals], [e["pass_at_1"] for e in evals], "o-", c="C3",
                    label="held-out pass@1")
            ax.legend(fontsize=8)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(curves):]:
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
