"""The report card's figures: PNG plots of a run's training records and evaluation results (matplotlib, Agg).

    from chatsmith.plots import plot_loss, pyplot
    plot_loss(train, val, sft_train, sft_val, run / "plots" / "loss.png")   # False (no file) when there is no data
    plt = pyplot()                                                          # for a figure of one's own

report.py draws `plot_loss`, `plot_lr`, `plot_throughput` and `plot_eval` into `<run>/plots/`; scaling.py draws its
ladder plot with `pyplot`. The records are train.read_metrics's (train: step, tokens, loss, lr, tok_s; val: step and
val_bpb or val_loss), the results report.eval_results's (per stage, per task: score, ci95, chance, metric, n).

Choices: matplotlib is imported only inside `pyplot` with the Agg backend, so importing this module costs nothing,
no display is needed, and a missing matplotlib surfaces as ImportError when a plot is drawn; val points sit at
step x (tokens per step of the train records), on a second axis beside the train loss; every figure is saved at
110 dpi and closed, so a long process does not pile figures up.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from types import ModuleType


def pyplot() -> ModuleType:
    """matplotlib.pyplot on the Agg backend; raises ImportError when matplotlib is not installed."""
    import matplotlib

    matplotlib.use("Agg")  # files only: works without a display
    import matplotlib.pyplot as plt

    return plt


def plot_loss(train: list[dict], val: list[dict], sft_train: list[dict], sft_val: list[dict], out: Path) -> bool:
    if not train and not sft_train:
        return False
    plt = pyplot()
    panels = [p for p in (("pretraining", train, val, "val_bpb", "val bits per byte"),
                          ("SFT", sft_train, sft_val, "val_loss", "val loss (nats / assistant token)")) if p[1]]
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.2), squeeze=False)
    for ax, (title, tr, va, key, label) in zip(axes[0], panels):
        ax.plot([r["tokens"] for r in tr], [r["loss"] for r in tr], color="tab:blue", lw=0.8, label="train loss")
        ax.set_xlabel("tokens seen")
        ax.set_ylabel("train loss (nats / token)", color="tab:blue")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        per_step = tr[-1]["tokens"] / max(1, tr[-1]["step"])
        points = [(r["step"] * per_step, r[key]) for r in va if r.get(key) is not None]
        if points:
            ax2 = ax.twinx()
            ax2.plot(*zip(*points), "o-", color="tab:red", label=label)
            ax2.set_ylabel(label, color="tab:red")
        ax.ticklabel_format(axis="x", style="sci", scilimits=(0, 0))
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return True


def plot_lr(train: list[dict], sft_train: list[dict], out: Path) -> bool:
    if not train and not sft_train:
        return False
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    for name, recs in (("pretraining", train), ("SFT", sft_train)):
        if recs:
            ax.plot([r["step"] for r in recs], [r["lr"] for r in recs], label=name)
    ax.set_xlabel("optimizer step (of each stage)")
    ax.set_ylabel("learning rate (embedding AdamW group)")
    ax.set_title("learning-rate schedule (the other groups follow the same shape)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return True


def plot_throughput(train: list[dict], sft_train: list[dict], out: Path) -> bool:
    if not train and not sft_train:
        return False
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    for name, recs, color in (("pretraining", train, "tab:blue"), ("SFT", sft_train, "tab:orange")):
        if recs:
            ax.plot([r["step"] for r in recs], [r["tok_s"] for r in recs], lw=0.7, color=color, label=name)
            med = statistics.median(r["tok_s"] for r in recs)
            ax.axhline(med, color=color, ls="--", lw=1, label=f"{name} median {med:,.0f} tokens/s")
    ax.set_xlabel("optimizer step (of each stage)")
    ax.set_ylabel("training throughput (tokens / s)")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return True


def plot_eval(results: dict[str, dict], out: Path) -> bool:
    stages = [s for s in ("base", "chat") if results.get(s, {}).get("tasks")]
    if not stages:
        return False
    plt = pyplot()
    fig, axes = plt.subplots(1, len(stages), figsize=(6.5 * len(stages), 4.2), squeeze=False)
    for ax, stage in zip(axes[0], stages):
        tasks = results[stage]["tasks"]
        names = list(tasks)
        xs = range(len(names))
        scores = [tasks[t]["score"] for t in names]
        lo = [max(0.0, s - tasks[t]["ci95"][0]) for s, t in zip(scores, names)]
        hi = [max(0.0, tasks[t]["ci95"][1] - s) for s, t in zip(scores, names)]
        ax.bar([x - 0.2 for x in xs], scores, 0.4, yerr=[lo, hi], capsize=3, color="tab:blue",
               label="score (95 % interval)")
        ax.bar([x + 0.2 for x in xs], [tasks[t]["chance"] for t in names], 0.4, color="lightgray",
               label="random chance")
        ax.set_xticks(list(xs), [f"{t}\n{tasks[t]['metric']}, n={tasks[t]['n']}" for t in names], fontsize=7,
                      rotation=30, ha="right")
        ax.set_ylabel("score (fraction correct)")
        ax.set_ylim(0, 1)
        ax.set_title(f"{stage} model, step {results[stage].get('step')}")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return True

