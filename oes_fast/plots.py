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


def _legend(ax, entries: int) -> None:
    # beside the axes once the lines are many: inside, the legend would hide them
    if entries > 5:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    else:
        ax.legend()


def psnr_curves(curves: dict, path, title: str = "PSNR against the clean image") -> None:
    """`curves`: label -> (steps, psnr values)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4 if len(curves) <= 5 else 8, 4))
    for i, (label, (steps, values)) in enumerate(curves.items()):
        if values:
            ax.plot(steps, values, label=label, **_style(i))
    ax.set_xlabel("training step")
    ax.set_ylabel("PSNR (dB)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    _legend(ax, len(curves))
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
