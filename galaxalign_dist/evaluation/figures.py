"""Evaluation figures as PNG files: confusion matrix, t-SNE/PCA embedding map, PCA thumbnail grid, retrieval."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure
from PIL import Image
from sklearn.decomposition import PCA
from sklearn.manifold import TSNE
from sklearn.metrics import confusion_matrix
from sklearn.neighbors import NearestNeighbors

# Figure objects are built directly (no pyplot): savefig renders PNGs through the Agg canvas, with no
# global backend switch and no figure registry to leak memory in long evaluation loops.
DPI = 100


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, bbox_inches="tight", format="png")
    return path


def _class_colors(num_classes: int) -> np.ndarray:
    cmap = colormaps["tab10" if num_classes <= 10 else "tab20"]
    return np.array([cmap(i % cmap.N) for i in range(num_classes)])


def confusion_matrix_png(
    y_true: np.ndarray, y_pred: np.ndarray, class_names: Sequence[str], path: str | Path
) -> Path:
    """Row-normalised confusion matrix (colour = fraction of the true class), raw counts annotated."""
    c = len(class_names)
    counts = confusion_matrix(y_true, y_pred, labels=list(range(c)))
    frac = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)  # empty rows stay 0, not NaN
    size = 2.5 + 0.6 * c
    fig = Figure(figsize=(size + 1.5, size))
    ax = fig.add_subplot()
    im = ax.imshow(frac, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of true class")
    for i in range(c):
        for j in range(c):
            ax.text(
                j, i, f"{counts[i, j]}", ha="center", va="center", fontsize=8,
                color="white" if frac[i, j] > 0.5 else "black",
            )  # fmt: skip
    ax.set_xticks(range(c), class_names, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(c), class_names, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    acc = np.trace(counts) / max(counts.sum(), 1)
    ax.set_title(f"confusion matrix (n={counts.sum()}, accuracy={acc:.3f})")
    return _save(fig, path)


def embedding_map_png(
    emb: np.ndarray,
    labels: np.ndarray,
    class_names: Sequence[str],
    path: str | Path,
    method: str = "tsne",
    seed: int = 0,
    max_points: int = 3000,
) -> Path:
    """2-D map of embeddings (t-SNE or PCA) coloured by class; at most ``max_points`` random points,
    since t-SNE is O(N log N) per iteration and a denser scatter shows nothing more."""
    emb = np.asarray(emb, dtype=np.float32)
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    if len(emb) > max_points:
        keep = np.sort(rng.choice(len(emb), size=max_points, replace=False))
        emb, labels = emb[keep], labels[keep]
    if method == "tsne":
        # perplexity must stay below the number of points; 30 is sklearn's default for larger sets.
        perplexity = float(min(30.0, max(2.0, (len(emb) - 1) / 3)))
        xy = TSNE(2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(emb)
    elif method == "pca":
        xy = PCA(2, random_state=seed).fit_transform(emb)
    else:
        raise ValueError(f"method must be 'tsne' or 'pca', got {method!r}")
    colors = _class_colors(len(class_names))
    fig = Figure(figsize=(8, 6.5))
    ax = fig.add_subplot()
    for c, name in enumerate(class_names):
        m = labels == c
        if m.any():
            ax.scatter(xy[m, 0], xy[m, 1], s=6, color=colors[c], label=f"{name} ({m.sum()})", alpha=0.8)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, markerscale=2, frameon=False)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(f"{method.upper()} of {len(emb)} embeddings")
    return _save(fig, path)


def _thumb(img: np.ndarray, size: int) -> np.ndarray:
    return np.asarray(Image.fromarray(np.asarray(img, dtype=np.uint8)).convert("RGB").resize((size, size)))


def pca_grid_png(
    emb: np.ndarray, images: np.ndarray, path: str | Path, grid: int = 12, thumb: int = 64
) -> Path:
    """Galaxy thumbnails laid out on the 2-D PCA plane of their embeddings (GalaxAlign paper, Fig. 5).

    A ``grid`` x ``grid`` lattice covers the bounding box of the projected points; each cell shows
    the galaxy nearest to the cell centre, or stays blank when that galaxy lies outside the cell,
    so the empty regions of the embedding plane stay visible.
    """
    images = np.asarray(images)
    if len(images) != len(emb):
        raise ValueError(f"{len(images)} images for {len(emb)} embeddings")
    pca = PCA(2, random_state=0)
    xy = pca.fit_transform(np.asarray(emb, dtype=np.float32))
    lo, hi = xy.min(axis=0), xy.max(axis=0)
    cell = np.maximum((hi - lo) / grid, 1e-12)
    # Row 0 of the mosaic is the top of the plot, i.e. the highest PC2 values.
    ix, iy = np.meshgrid(np.arange(grid), np.arange(grid)[::-1])
    centres = lo + (np.stack([ix.ravel(), iy.ravel()], axis=1) + 0.5) * cell
    _, nearest = NearestNeighbors(n_neighbors=1).fit(xy).kneighbors(centres)
    nearest = nearest[:, 0]
    inside = np.all(np.abs(xy[nearest] - centres) <= cell / 2 + 1e-9, axis=1)

    mosaic = np.full((grid * thumb, grid * thumb, 3), 255, dtype=np.uint8)
    for cell_no in np.flatnonzero(inside):
        r, c = divmod(cell_no, grid)
        mosaic[r * thumb : (r + 1) * thumb, c * thumb : (c + 1) * thumb] = _thumb(
            images[nearest[cell_no]], thumb
        )
    side = max(6.0, grid * thumb / DPI)
    fig = Figure(figsize=(side, side))
    ax = fig.add_subplot()
    ax.imshow(mosaic, extent=(lo[0], hi[0], lo[1], hi[1]), aspect="auto", interpolation="lanczos")
    ev = pca.explained_variance_ratio_
    ax.set_xlabel(f"PC1 ({ev[0]:.0%} of variance)")
    ax.set_ylabel(f"PC2 ({ev[1]:.0%} of variance)")
    ax.set_title(f"{int(inside.sum())} of {len(emb)} galaxies nearest to {grid}x{grid} grid centres")
    return _save(fig, path)


def retrieval_png(
    query_images: np.ndarray,
    result_images: np.ndarray,
    scores: np.ndarray,
    path: str | Path,
    titles: Sequence[str] | None = None,
    query_labels: np.ndarray | None = None,
    result_labels: np.ndarray | None = None,
    class_names: Sequence[str] | None = None,
) -> Path:
    """One row per query: the query (Q, H, W, 3) then its top-k results (Q, K, H, W, 3) with scores (Q, K).

    When ``query_labels`` (Q,) and ``result_labels`` (Q, K) are given, results get a green border if
    they share the query's class and red otherwise, and the row reports precision@K.
    """
    q, k = np.shape(scores)
    if len(query_images) != q or np.shape(result_images)[:2] != (q, k):
        raise ValueError(
            f"shapes disagree: {len(query_images)} queries, results {np.shape(result_images)[:2]}, "
            f"scores {(q, k)}"
        )
    labelled = query_labels is not None and result_labels is not None

    def name(label: int) -> str:
        return class_names[label] if class_names is not None else str(label)

    fig = Figure(figsize=(1.8 * (k + 1), 2.1 * q))
    axes = fig.subplots(q, k + 1, squeeze=False)
    for i in range(q):
        ax = axes[i, 0]
        ax.imshow(query_images[i])
        title = titles[i] if titles is not None else "query"
        if labelled:
            hits = int(np.sum(np.asarray(result_labels[i]) == query_labels[i]))
            title += f"\n{name(query_labels[i])}\nP@{k}={hits / k:.2f}"
        ax.set_title(title, fontsize=7)
        for j in range(k):
            ax = axes[i, j + 1]
            ax.imshow(result_images[i][j])
            text = f"#{j + 1}  {scores[i][j]:.3f}"
            if labelled:
                same = result_labels[i][j] == query_labels[i]
                for spine in ax.spines.values():
                    spine.set_edgecolor("tab:green" if same else "tab:red")
                    spine.set_linewidth(4)
                text += f"\n{name(result_labels[i][j])}"
            ax.set_title(text, fontsize=7)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    return _save(fig, path)
