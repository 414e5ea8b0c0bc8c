"""Masks as data: one boolean tensor per parameter, keyed by parameter name.

The flat order (`to_flat`, `from_flat`) is the reference order of `model.parameters()`
(oes_fast.flat). Files are safetensors with metadata: the format and its version, the density,
the architecture (model config) and the seeds that rebuild the weights the mask belongs to.
"""
from __future__ import annotations

import json
import math
import os
from collections import OrderedDict
from dataclasses import dataclass
from typing import Mapping

import torch
from torch import nn

from . import rng
from .connectivity import dead_convs
from .files import atomic_path
from .flat import FlatLayout

FORMAT = "oes_fast.mask"
FORMAT_VERSION = 1


class MaskMismatchError(ValueError):
    """A mask that does not fit a model (names, shapes or architecture)."""


class Mask:
    """Per-parameter boolean masks (True = kept), in the model's parameter order.

    `seed` is the weight seed (`oes_fast.models.skip_oes(seed=mask.seed)` rebuilds the
    weights the mask was found for), `z_seed` the seed of the DIP input, `architecture` the
    model's config; `meta` holds anything else worth keeping (JSON-serializable).
    """

    def __init__(self, tensors: Mapping[str, torch.Tensor], *, architecture: dict | None = None,
                 seed: int | None = None, z_seed: int | None = None, meta: dict | None = None):
        self.tensors: OrderedDict[str, torch.Tensor] = OrderedDict()
        for name, t in tensors.items():
            if t.dtype != torch.bool:
                raise TypeError(f"mask for {name!r} must be a bool tensor, got {t.dtype}")
            self.tensors[name] = t.detach().to("cpu")
        self.architecture = architecture
        self.seed = seed
        self.z_seed = z_seed
        self.meta = dict(meta or {})

    # --- mapping interface
    def __getitem__(self, name: str) -> torch.Tensor:
        return self.tensors[name]

    def __iter__(self):
        return iter(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)

    def items(self):
        return self.tensors.items()

    @property
    def layout(self) -> FlatLayout:
        return FlatLayout.from_shapes({n: t.shape for n, t in self.tensors.items()})

    # --- counts
    @property
    def numel(self) -> int:
        return sum(t.numel() for t in self.tensors.values())

    @property
    def kept(self) -> int:
        return sum(int(t.sum()) for t in self.tensors.values())

    @property
    def density(self) -> float:
        """Fraction of parameters kept."""
        return self.kept / self.numel if self.numel else 0.0

    @property
    def sparsity(self) -> float:
        """Fraction of parameters pruned (1 - density)."""
        return 1.0 - self.density

    def to_flat(self) -> torch.Tensor:
        return self.layout.flatten(self.tensors)

    def layer_stats(self) -> list[dict]:
        """Per parameter: name, shape, numel, kept, density; for conv weights also the output
        channels with nothing kept (`empty_out_channels`)."""
        rows = []
        for name, t in self.tensors.items():
            row = dict(name=name, shape=tuple(t.shape), numel=t.numel(), kept=int(t.sum()))
            row["density"] = row["kept"] / row["numel"] if row["numel"] else 0.0
            if t.dim() == 4:
                row["out_channels"] = t.shape[0]
                row["empty_out_channels"] = int((~t.flatten(1).any(1)).sum())
            rows.append(row)
        return rows

    # --- relation to a model
    def check_fits(self, model: nn.Module) -> None:
        """Raise MaskMismatchError naming the first parameter that does not line up."""
        params = list(model.named_parameters())
        masks = list(self.tensors.items())
        for i, ((pname, p), (mname, m)) in enumerate(zip(params, masks)):
            if pname != mname or p.shape != m.shape:
                raise MaskMismatchError(
                    f"mask does not fit the model at parameter {i}: model has {pname!r} {tuple(p.shape)}, "
                    f"mask has {mname!r} {tuple(m.shape)}"
                )
        if len(params) != len(masks):
            which = "model" if len(params) > len(masks) else "mask"
            extra = (params if which == "model" else masks)[min(len(params), len(masks))][0]
            raise MaskMismatchError(
                f"mask does not fit the model: the model has {len(params)} parameters, the mask {len(masks)}; "
                f"first unmatched ({which}): {extra!r}"
            )
        config = getattr(model, "config", None)
        if self.architecture is not None and config is not None and dict(config) != dict(self.architecture):
            diff = sorted(k for k in set(config) | set(self.architecture) if config.get(k) != self.architecture.get(k))
            raise MaskMismatchError(f"mask was made for another architecture: differs in {diff}")

    @torch.no_grad()
    def apply_(self, model: nn.Module) -> nn.Module:
        """Zero the pruned parameters of `model` in place."""
        self.check_fits(model)
        for name, p in model.named_parameters():
            p.mul_(self.tensors[name].to(device=p.device, dtype=p.dtype))
        return model

    def __repr__(self) -> str:
        return f"Mask({len(self)} parameters, kept {self.kept} of {self.numel}, density {self.density:.4f})"


@dataclass
class MaskHealth:
    """Whether a mask leaves a path through the network. `disconnected` lists the layers that
    pass no signal: a conv with every weight pruned (its output is its bias, a constant) or a
    batch norm with every scale pruned (its output is its shift). The hourglass has no skip
    branches, so one such layer makes the whole output constant."""

    disconnected: list[str]
    sparse_layers: list[tuple[str, int]]  # conv weights keeping fewer than 1% of entries, with their kept count

    @property
    def ok(self) -> bool:
        return not self.disconnected

    @property
    def message(self) -> str:
        if self.ok:
            return "every layer keeps some weights"
        shown = 3  # the rest only counted: a random mask can cut every layer of the network
        listed = ", ".join(self.disconnected[:shown])
        if len(self.disconnected) > shown:
            listed += f" and {len(self.disconnected) - shown} more"
        return f"nothing kept in {len(self.disconnected)} layer{'s' if len(self.disconnected) > 1 else ''}: {listed}"


def health(mask: Mask, model: nn.Module) -> MaskHealth:
    """Whether `mask` (which must fit `model`, else MaskMismatchError) leaves a signal path
    through `model`: a MaskHealth listing the convs and batch norms that pass nothing (every
    weight or scale pruned, or, for the OES hourglass, no live channel path:
    oes_fast.connectivity.dead_convs) and the conv weights keeping under 1 %."""
    mask.check_fits(model)
    disconnected, sparse_layers = [], []
    for module_name, module in model.named_modules():
        prefix = f"{module_name}." if module_name else ""
        if isinstance(module, nn.modules.conv._ConvNd):
            kept = int(mask[prefix + "weight"].sum())
            if kept == 0:
                disconnected.append(f"{module_name} (conv: all weights pruned)")
            elif kept < 0.01 * module.weight.numel():
                sparse_layers.append((module_name, kept))
        elif isinstance(module, nn.modules.batchnorm._BatchNorm) and module.affine:
            if not bool(mask[prefix + "weight"].any()):
                disconnected.append(f"{module_name} (batch norm: all scales pruned)")
    if not disconnected:
        disconnected = dead_convs(mask, model)
    return MaskHealth(disconnected, sparse_layers)


def from_flat(model: nn.Module, flat: torch.Tensor, **attributes) -> Mask:
    """Mask from `flat`, a 1-D bool tensor with one entry per parameter element of `model`, in
    the model's parameter order (oes_fast.flat); `attributes` (architecture, seed, z_seed, meta)
    go to the Mask, the architecture defaulting to `model.config`."""
    flat = torch.as_tensor(flat)
    if flat.dtype != torch.bool:
        raise TypeError(f"flat mask must be bool, got {flat.dtype}")
    layout = FlatLayout.from_model(model)
    if flat.dim() != 1 or flat.numel() != layout.numel:
        raise MaskMismatchError(
            f"flat mask has {flat.numel()} elements but the model has {layout.numel} parameters"
        )
    attributes.setdefault("architecture", getattr(model, "config", None))
    return Mask(layout.views(flat.cpu()), **attributes)


def check_density(density: float) -> float:
    """`density` as a float, or ValueError unless it is in (0, 1] (the fraction of parameters kept)."""
    density = float(density)
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density}")
    return density


def topk(logits, density: float, *, seed: int = 0, model: nn.Module | None = None, **attributes) -> Mask:
    """Hard mask keeping the round(density * n) largest logits over ALL parameters.

    `logits` is a mapping name -> real tensor (the usual case), or a flat tensor together with
    `model` for the names; any float dtype and device, no NaN. `density` in (0, 1] (at least one
    parameter kept). Ties at the threshold are broken by keys seeded with `seed` (int >= 0).
    Returns a Mask of CPU bool tensors shaped like the logits; `attributes` go to it.
    """
    density = check_density(density)
    if isinstance(logits, Mapping):
        layout = FlatLayout.from_shapes({n: t.shape for n, t in logits.items()})
        flat = layout.flatten({n: t.detach() for n, t in logits.items()})
    else:
        if model is None:
            raise TypeError("topk: a flat logits tensor needs model= for the parameter names")
        layout = FlatLayout.from_model(model)
        flat = logits.detach().reshape(-1)
        if flat.numel() != layout.numel:
            raise MaskMismatchError(f"logits have {flat.numel()} elements, the model {layout.numel} parameters")
        attributes.setdefault("architecture", getattr(model, "config", None))
    if torch.isnan(flat).any():
        raise ValueError("topk: logits contain NaN")
    n = flat.numel()
    k = round(density * n)
    if k == 0:
        raise ValueError(f"density {density} keeps no parameter of {n}")
    flat = flat.cpu().double()
    threshold = torch.kthvalue(flat, n - k + 1).values  # the k-th largest logit
    keep = flat > threshold
    ties = torch.nonzero(flat == threshold).flatten()
    missing = k - int(keep.sum())
    if missing:
        # ties at the threshold: the largest seeded keys win (then the lower index, by stable sort)
        tiebreak = rng.uniform((n,), rng.stream_seed(seed, "topk"))[ties]
        keep[ties[torch.sort(tiebreak, descending=True, stable=True).indices[:missing]]] = True
    mask = Mask(layout.views(keep), **attributes)
    mask.meta.setdefault("density_requested", density)
    return mask


# ------------------------------------------------------------------------------ files
def save(mask: Mask, path) -> None:
    """Write `mask` to `path` (str or path-like) as a safetensors file with its seeds,
    architecture and meta, atomically (oes_fast.files.atomic_path)."""
    from safetensors.torch import save_file

    metadata = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "density": repr(mask.density),
        "kept": str(mask.kept),
        "numel": str(mask.numel),
        "order": json.dumps(list(mask.tensors)),
        "architecture": json.dumps(mask.architecture),
        "seed": json.dumps(mask.seed),
        "z_seed": json.dumps(mask.z_seed),
        "meta": json.dumps(mask.meta),
    }
    with atomic_path(path) as tmp:
        save_file({n: t.contiguous() for n, t in mask.tensors.items()}, tmp, metadata=metadata)


def load(path) -> Mask:
    """Read the Mask in a file written by `save` (FileNotFoundError if missing, ValueError
    naming the file for anything else)."""
    from safetensors import safe_open

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"mask file not found: {path}")
    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except Exception as exc:  # safetensors raises several types for a damaged file
        raise ValueError(f"{path} is not a readable mask file (corrupt or not safetensors): {exc}") from exc
    if metadata.get("format") != FORMAT:
        raise ValueError(f"{path} is not an oes_fast mask file (format {metadata.get('format')!r})")
    version = int(metadata.get("format_version", -1))
    if version != FORMAT_VERSION:
        raise ValueError(f"{path} has mask format version {version}; this oes_fast reads version {FORMAT_VERSION}")
    try:
        order = json.loads(metadata["order"])
        attributes = dict(architecture=json.loads(metadata["architecture"]), seed=json.loads(metadata["seed"]),
                          z_seed=json.loads(metadata["z_seed"]), meta=json.loads(metadata["meta"]))
    except (KeyError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path} has damaged mask metadata: {exc}") from exc
    if sorted(order) != sorted(tensors):
        raise ValueError(f"{path}: the parameter list in the metadata does not match the stored tensors")
    mask = Mask({name: tensors[name] for name in order}, **attributes)
    if mask.kept != int(metadata.get("kept", -1)):
        raise ValueError(f"{path}: stored masks keep {mask.kept} parameters, the metadata says {metadata.get('kept')}")
    return mask


def load_published(path, model: nn.Module, **attributes) -> Mask:
    """A mask as the OES authors published it: an .npz holding `bits`, the numpy.packbits of the
    flat boolean mask in the OES network's parameter order, and `numel`. `attributes` (seed,
    z_seed, meta) go to the Mask, since the file says nothing of the weights it was found for.
    `model`: the network it belongs to (oes_fast.models.skip_oes() for the authors' masks);
    returns a Mask of CPU bool tensors shaped like its parameters."""
    import numpy as np

    data = np.load(os.fspath(path))
    flat = torch.from_numpy(np.unpackbits(data["bits"])[:int(data["numel"])].astype(bool))
    return from_flat(model, flat, **attributes)


BUNDLED_FILE = "bundled_density0.05.safetensors"
# The sparser bundled mask: an OES search at density 0.025 on the same astronaut sample (10,000
# steps), then every 1-D parameter kept (`keep_vectors`). Taken on request (density=0.025): at
# 256x256 it overfits less than the 0.05 mask but also peaks lower, and ends lower on barbara
# (docs/quality.md#density-by-image-size-256x256), so `auto_density` does not pick it.
BUNDLED_SMALL_FILE = "bundled_density0.025_vectors.safetensors"
# The mask for larger images: an OES search on the whole 512x512 astronaut (20,000 steps, density
# 0.05, sigma 0.1, seeds 0; scripts/make_bundled_mask.py --size 512). On three 512x512 photographs
# neither mask was searched on it ends 0.80 and 0.84 dB above the 256x256 mask (barbara, baboon)
# and 0.41 dB below (pepper), 4,000 steps (docs/quality.md#a-mask-searched-on-the-whole-512x512-astronaut).
BUNDLED_512_FILE = "bundled_density0.05_512.safetensors"
# The same search's largest 10 % of scores (the 0.05 mask is a subset of it). Taken on request
# (density=0.1): at 512x512 with the noise level it ends 0.33 and 0.28 dB above the 0.05 mask on
# barbara and baboon, ties on pepper and the astronaut, and costs about 1.4x the time per step
# (docs/quality.md#fitting-down-to-the-noise-level), so `auto_density` does not pick it.
BUNDLED_DENSE_512_FILE = "bundled_density0.1_512.safetensors"
# (density, side of the square astronaut image the search ran on): file. `bundled` takes, of the
# masks at the density wanted, the one searched at the pixel count nearest the image's.
BUNDLED_FILES = {(0.05, 256): BUNDLED_FILE, (0.025, 256): BUNDLED_SMALL_FILE, (0.05, 512): BUNDLED_512_FILE,
                 (0.1, 512): BUNDLED_DENSE_512_FILE}


def keep_vectors(mask: Mask) -> Mask:
    """A copy of `mask` that keeps every 1-D parameter (batch-norm scales and shifts, biases): a
    few thousand of the OES network's 3 million parameters. A low-density search prunes whole
    batch-norm layers (every scale) and so cuts the network; with the vectors kept, the convs
    alone carry the sparsity."""
    tensors = {n: (torch.ones_like(t) if t.dim() == 1 else t.clone()) for n, t in mask.items()}
    out = Mask(tensors, architecture=mask.architecture, seed=mask.seed, z_seed=mask.z_seed, meta=dict(mask.meta))
    out.meta["vectors_kept"] = True
    return out


def auto_density(pixels: int) -> float:
    """The density `--density auto` stands for at an image of `pixels` pixels (the network's input
    size, H x W). Measured at 256x256 and 512x512 (docs/quality.md#density-by-image-size-256x256): 0.05,
    the paper's, at both; at 256x256, 0.025 (vectors kept) ended no better on the two images it
    was chosen on (pepper, astronaut) and 1.2 dB lower on barbara; at 512x512, 0.1 fell 0.80 dB
    from its peak on pepper and ended lower there with the plain loss, and with the noise level
    ended within 0.04 dB of 0.05 on both (at about 1.4x the time per step)."""
    if pixels <= 0:
        raise ValueError(f"pixels must be positive, got {pixels}")
    return 0.05


def bundled(pixels: int | None = None, density: float | None = None) -> Mask:
    """A mask shipped with the package, found by this package's OES search on the built-in
    astronaut sample (see `mask.meta` for the image, noise and budget; BUNDLED_FILES lists them):
    of those at `density` (else the one `auto_density(pixels)` picks, else 0.05), the one
    searched at the pixel count nearest `pixels` (by ratio; the smallest search size without
    `pixels`). `mask.meta["bundled_file"]` names it. Its `seed` and `z_seed` rebuild the weights
    and input it belongs to: `oes_fast.models.skip_oes(seed=mask.seed)`,
    `oes_fast.models.dip_input(32, H, W, seed=mask.z_seed)`."""
    if pixels is not None and pixels <= 0:
        raise ValueError(f"pixels must be positive, got {pixels}")
    wanted = density if density is not None else (auto_density(pixels) if pixels is not None else 0.05)
    sides = sorted(side for d, side in BUNDLED_FILES if d == wanted)
    if not sides:
        densities = sorted({d for d, _ in BUNDLED_FILES})
        raise ValueError(f"there is no bundled mask at density {wanted}: the bundled masks have density "
                         f"{', '.join(str(d) for d in densities)} (search one, or give a mask file)")
    side = sides[0] if pixels is None else min(sides, key=lambda s: abs(math.log(pixels / (s * s))))
    name = BUNDLED_FILES[wanted, side]
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", name)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"the bundled mask is missing from this installation ({path})")
    mask = load(path)
    mask.meta["bundled_file"] = name
    return mask
