"""Figures written by the command line: PSNR curves and per-layer density profiles."""
from __future__ import annotations

from .files import atomic_path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path) -> None:
    with atomic_path(path, ".png") as tmp:
        fig.savefig(tmp, dpi=120, bbox_inches="tight")


def _style(i: int) -> dict:
    """Line i's color and dash: ten colors, then the same colors dashed, then dotted, so that
    up to 30 lines stay apart."""
    return dict(color=f"C{i % 10}", linestyle=("-", "--", ":")[(i // 10) % 3])


def _legend(ax, entries: int, loc: str = "best") -> None:
    # beside the axes once the lines are many: inside, the legend would hide them
    if entries > 5:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    else:
        ax.legend(loc=loc, fontsize=8)


def psnr_curves(curves: dict, path, title: str = "PSNR against the clean image", points: dict | None = None) -> None:
    """`curves`: label -> (steps, psnr values), drawn as lines; `points`: label -> (steps, values)
    drawn as markers only (reference figures read from elsewhere, e.g. another paper's logs)."""
    plt = _pyplot()
    n = len(curves) + len(points or {})
    fig, ax = plt.subplots(figsize=(6.4 if n <= 5 else 8, 4))
    for i, (label, (steps, values)) in enumerate(curves.items()):
        if values:
            ax.plot(steps, values, label=label, **_style(i))
    for label, (steps, values) in (points or {}).items():
        ax.plot(steps, values, "k*", markersize=8, linestyle="none", label=label)
    ax.set_xlabel("training step")
    ax.set_ylabel("PSNR (dB)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    _legend(ax, n, loc="lower right")  # PSNR curves rise to the top: the bottom right is empty
    _save(fig, path)
    plt.close(fig)


def layer_densities(masks: dict, path, title: str = "Kept fraction per layer") -> None:
    """`masks`: label -> Mask. One line per mask over the conv weights, in network order."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4))
    names = None
    for i, (label, mask) in enumerate(masks.items()):
        rows = [r for r in mask.layer_stats() if len(r["shape"]) == 4]
        names = [r["name"].removesuffix(".weight") for r in rows]
        ax.plot(range(len(rows)), [r["density"] for r in rows], marker="o", label=f"{label} ({mask.density:.3f})",
                **_style(i))
    if names:
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=70, fontsize=7)
    ax.set_ylabel("density (kept fraction)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    _legend(ax, len(masks))
    _save(fig, path)
    plt.close(fig)


def loss_curve(losses, path, title: str = "training loss (no reference image: no PSNR)") -> None:
    """The loss at every step, on a log scale: what a run without a clean reference can show."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4))
    ax.plot(range(1, len(losses) + 1), losses, color="C0")
    if losses and min(losses) > 0:
        ax.set_yscale("log")
    ax.set_xlabel("training step")
    ax.set_ylabel("loss (mean squared error on the observed values)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    _save(fig, path)
    plt.close(fig)


def side_by_side(panels: dict, path, max_width: int = 1800, max_height: int = 900) -> None:
    """`panels`: label -> (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) float array in [0, 1], shown left to
    right at one height that a screen shows (at most max_height, all together at most max_width;
    never enlarged past 2x), labeled; transparent pixels over a checkerboard."""
    import numpy as np
    from PIL import Image, ImageDraw

    tiles = []
    height = min(max_height, 2 * max(a.shape[0] for a in panels.values()))
    widths = [a.shape[1] * height / a.shape[0] for a in panels.values()]
    gap = 8
    scale = min(1.0, (max_width - gap * (len(panels) - 1)) / sum(widths))
    height = max(1, round(height * scale))
    for array in panels.values():
        a = np.asarray(array, dtype=np.float64)
        a = a[:, :, None] if a.ndim == 2 else a
        alpha = a[:, :, 3:4] if a.shape[2] in (2, 4) else np.ones_like(a[:, :, :1])
        rgb = np.repeat(a[:, :, :1], 3, axis=2) if a.shape[2] in (1, 2) else a[:, :, :3]
        yy, xx = np.mgrid[0:a.shape[0], 0:a.shape[1]]
        board = np.where(((yy // 8 + xx // 8) % 2 == 0)[:, :, None], 0.8, 0.6)
        rgb = rgb * alpha + board * (1 - alpha)
        im = Image.fromarray(np.round(np.clip(rgb, 0, 1) * 255).astype(np.uint8))
        width = max(1, round(a.shape[1] * height / a.shape[0]))
        # nearest when enlarging (pixels stay visible, as in a viewer's zoom), Lanczos when reducing
        method = Image.Resampling.NEAREST if height > a.shape[0] else Image.Resampling.LANCZOS
        tiles.append(im.resize((width, height), method))
    label_height = 18
    canvas = Image.new("RGB", (sum(t.width for t in tiles) + gap * (len(tiles) - 1), height + label_height), "white")
    draw = ImageDraw.Draw(canvas)
    x = 0
    for label, tile in zip(panels, tiles):
        canvas.paste(tile, (x, label_height))
        draw.text((x + 4, 3), label, fill="black")
        x += tile.width + gap
    with atomic_path(path, ".png") as tmp:
        canvas.save(tmp, format="PNG")
