"""Figures: training curves, embedding drift, embedding maps and attention heatmaps."""

from __future__ import annotations

import json
from pathlib import Path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; no display needed
    import matplotlib.pyplot as plt

    return plt


def read_metrics(path: Path) -> list[dict]:
    if not Path(path).exists():
        return []
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def plot_training_curves(metrics_path: Path, out_path: Path) -> None:
    """Training and dev loss against steps, and dev BLEU, in one PNG."""
    records = read_metrics(metrics_path)
    train = [r for r in records if r["kind"] == "train"]
    val = [r for r in records if r["kind"] == "val"]
    plt = _pyplot()
    fig, (ax_loss, ax_bleu) = plt.subplots(1, 2, figsize=(10, 4))
    if train:
        ax_loss.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss (label-smoothed)")
    if val:
        ax_loss.plot([r["step"] for r in val], [r["loss"] for r in val], "o-", label="dev loss")
        ax_bleu.plot([r["step"] for r in val], [r["bleu"] for r in val], "o-", color="tab:green")
    ax_loss.set(xlabel="step", ylabel="loss per target token", title="loss")
    ax_loss.legend()
    ax_bleu.set(xlabel="step", ylabel="BLEU", title="dev BLEU")
    fig.tight_layout()
    tmp = Path(out_path).with_name(f".{Path(out_path).name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(out_path)


def _save(fig, plt, out_path: Path) -> None:
    """Write a figure atomically (a reader never sees half a PNG) and close it."""
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(out_path)


def plot_embedding_drift(metrics: Path | dict[str, Path], out_path: Path) -> None:
    """The "embeddings" records of one run's metrics.jsonl (or of several, {label: path}) against steps:
    mean L2 distance from step 0, share of rows moved, and rows never changed, per side."""
    runs = metrics if isinstance(metrics, dict) else {"": metrics}
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    styles = {"src": "o-", "tgt": "s--"}
    for number, (label, path) in enumerate(runs.items()):
        records = [r for r in read_metrics(path) if r["kind"] == "embeddings"]
        if not records:
            continue
        steps = [0] + [r["step"] for r in records]  # at step 0 nothing has moved, by definition
        for side in ("src", "tgt"):
            name, rows = f"{label} {side}".strip(), records[0][side]["rows"]
            style = {"color": f"C{number}" if len(runs) > 1 else None, "label": name}
            axes[0].plot(steps, [0.0] + [r[side]["mean_l2"] for r in records], styles[side], **style)
            axes[1].plot(steps, [0.0] + [100 * r[side]["moved_share"] for r in records], styles[side], **style)
            axes[2].plot(steps, [rows] + [r[side]["unchanged_rows"] for r in records], styles[side], **style)
    axes[0].set(xlabel="step", ylabel="mean L2 distance of rows from step 0", title="how far rows moved")
    axes[1].set(xlabel="step", ylabel="% of rows", title="rows that moved at all")
    axes[2].set(xlabel="step", ylabel="rows", title="rows never changed (pad excluded)")
    for ax in axes:
        ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, plt, out_path)


def plot_embedding_map(points, labels: list[str], out_path: Path, title: str) -> None:
    """A labelled scatter of 2-D points (N, 2), e.g. a PCA projection of embedding rows."""
    plt = _pyplot()
    points = points.detach().float().cpu().numpy() if hasattr(points, "detach") else points
    fig, ax = plt.subplots(figsize=(11, 9))
    ax.scatter(points[:, 0], points[:, 1], s=8, color="tab:blue", alpha=0.6)
    for (x, y), label in zip(points, labels):
        ax.annotate(label, (x, y), fontsize=7, xytext=(2, 2), textcoords="offset points")
    ax.set(title=title, xlabel="principal component 1", ylabel="principal component 2")
    fig.tight_layout()
    _save(fig, plt, out_path)


def plot_attention(src_pieces: list[str], tgt_pieces: list[str], weights, out_path: Path) -> None:
    """An alignment heatmap as in Bahdanau et al. 2015, figure 3: source pieces across the top,
    target pieces down the side, white = weight 1, black = 0. weights (T, S)."""
    plt = _pyplot()
    weights = weights.detach().float().cpu().numpy() if hasattr(weights, "detach") else weights
    height, width = weights.shape
    fig, ax = plt.subplots(figsize=(max(3.0, 0.45 * width + 1.5), max(3.0, 0.45 * height + 1.5)))
    ax.imshow(weights, cmap="gray", vmin=0.0, vmax=1.0, aspect="equal")
    ax.set_xticks(range(width), labels=src_pieces, rotation=90)
    ax.set_yticks(range(height), labels=tgt_pieces)
    ax.xaxis.tick_top()
    ax.set_xlabel("source")
    ax.set_ylabel("translation")
    fig.tight_layout()
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
