"""Which channels of a masked DIP hourglass carry signal: the channel analysis that the mask's
health check (oes_fast.masks.health) and the sparse compaction (oes_fast.sparse) share.

The OES hourglass without skip branches is one chain of stages (conv, pool, batch norm,
activation, upsample, ..., 1x1 conv, sigmoid). Walking it forward, every channel of every
intermediate tensor is either *variable* or a spatial *constant* (a conv output channel none of
whose kept taps reads a variable channel; a batch norm output whose input is constant or whose
scale is pruned); walking back from the output, a variable channel is *live* when a live channel
reads it through a kept tap. A mask is a mapping from parameter name to a boolean tensor
(oes_fast.masks.Mask); this module reads it and never imports oes_fast.masks.
"""
from __future__ import annotations

import torch
from torch import nn

# The activations the analysis handles: each maps 0 to 0, so a structurally zero channel stays
# zero through it (oes_fast.sparse implements each of them).
ACTIVATIONS = ("LeakyReLU", "ReLU", "ELU", "none")


def supports(model: nn.Module) -> bool:
    """Whether the analysis (and so oes_fast.sparse.SparseGenerator) takes this network: the
    Skip hourglass (`model.config["name"] == "skip"`) without skip branches, with reflection
    padding and one of ACTIVATIONS."""
    cfg = getattr(model, "config", None) or {}
    return (cfg.get("name") == "skip" and not any(cfg["channels_skip"]) and cfg["pad"] == "reflection"
            and cfg["act"] in ACTIVATIONS)


def chain(model: nn.Module) -> list[tuple]:
    """The Skip network without skip branches as a list of stages (kind, parameter prefix,
    module, arg): kind is "conv", "bn", "act", "pool", "up" or "sigmoid"; arg is the conv's fused
    upsampling factor (or None), the activation's, pooling's or upsampling's mode."""
    cfg = model.config
    if any(cfg["channels_skip"]):
        raise NotImplementedError("SparseGenerator supports the hourglass without skip branches (OES configuration)")
    if cfg["pad"] != "reflection":
        raise ValueError("SparseGenerator needs reflection padding: constant folding is exact only under it")
    if cfg["act"] not in ACTIVATIONS:
        raise ValueError(f"unsupported activation {cfg['act']!r}")
    act = ("act", None, None, cfg["act"])
    stages = []
    for i, block in enumerate(model.down):
        stages += [("conv", f"down.{i}.conv1", block.conv1, None), ("pool", None, None, cfg["downsample"]),
                   ("bn", f"down.{i}.bn1", block.bn1, None), act,
                   ("conv", f"down.{i}.conv2", block.conv2, None), ("bn", f"down.{i}.bn2", block.bn2, None), act]
    for i in reversed(range(model.levels)):
        up = model.up[str(i)]
        if cfg["upsample"] == "nearest":
            # Nearest upsampling repeats every value u*u times, so batch statistics (mean, biased
            # variance) before and after it are the same: batch norm runs on the small tensor and
            # the upsampling is fused into the conv's input load.
            stages += [("bn", f"up.{i}.bn_in", up.bn_in, None), ("conv", f"up.{i}.conv", up.conv, 2)]
        else:
            stages += [("up", None, None, cfg["upsample"]), ("bn", f"up.{i}.bn_in", up.bn_in, None),
                       ("conv", f"up.{i}.conv", up.conv, None)]
        stages += [("bn", f"up.{i}.bn", up.bn, None), act]
    stages.append(("conv", "out", model.out, None))
    if cfg["sigmoid"]:
        stages.append(("sigmoid", None, None, None))
    return stages


@torch.no_grad()
def live_channels(model: nn.Module, mask) -> tuple[list[tuple], list[dict]]:
    """(stages, info): `chain(model)` and, per stage, boolean channel vectors (CPU): `var_in`,
    `var_out` (channels that vary over space), `zero_in`, `zero_out` (constant channels that are
    structurally zero), `live_in`, `live_out` (variable channels the output needs; the output
    conv keeps all its channels); for convs also `taps` (C_out, C_in: any kept tap) and `fold`
    (constant, possibly nonzero input channels). `mask`: parameter name -> bool tensor shaped
    like the parameter."""
    stages = chain(model)
    c = model.config["in_channels"]
    # ---- forward: which channels vary, which constants are structurally zero
    var, zero = torch.ones(c, dtype=torch.bool), torch.zeros(c, dtype=torch.bool)
    info = []
    for kind, prefix, module, arg in stages:
        entry = dict(var_in=var, zero_in=zero)
        if kind == "conv":
            wm = mask[f"{prefix}.weight"].any(3).any(2)  # (C_out, C_in): any kept tap
            bm = mask[f"{prefix}.bias"] if module.bias is not None else torch.zeros(wm.shape[0], dtype=torch.bool)
            fold = ~var & ~zero  # constant channels that may be nonzero
            var = (wm & var[None]).any(1)
            zero = ~bm & ~(wm & fold[None]).any(1)
            entry.update(taps=wm, fold=fold)
        elif kind == "bn":
            var = var & mask[f"{prefix}.weight"]
            zero = ~mask[f"{prefix}.bias"]
        elif kind == "sigmoid":
            zero = torch.zeros_like(zero)
        # act (f(0) = 0 for every supported one), pool, up: unchanged
        entry.update(var_out=var, zero_out=zero)
        info.append(entry)
    # ---- backward: which variable channels are needed (live)
    need = torch.ones(len(var), dtype=torch.bool)  # every output channel is produced
    last_conv = max(i for i, s in enumerate(stages) if s[0] == "conv")
    for j in reversed(range(len(stages))):
        kind = stages[j][0]
        e = info[j]
        if j == last_conv:
            live_out = torch.ones_like(need)  # the output conv keeps all channels, constant or not
        else:
            live_out = need & e["var_out"]
        e["live_out"] = live_out
        if kind == "conv":
            need = e["var_in"] & (e["taps"][live_out]).any(0)
        else:
            need = live_out & e["var_in"]
        e["live_in"] = need
    return stages, info


def dead_convs(mask, model: nn.Module) -> list[str]:
    """Convs that no live channel path reaches: for a network `supports` takes, the names
    (e.g. "down.1.conv2") of the convs with no live input or no live output channel, each with
    the reason; [] for any other network. A layer can keep weights and scales that never line
    up: a kept weight whose output channel's batch-norm scale is pruned carries nothing."""
    if not supports(model):
        return []
    stages, info = live_channels(model, mask)
    return [f"{prefix} (conv: no channel path from the input survives)"
            for (kind, prefix, _, _), e in zip(stages, info)
            if kind == "conv" and not (e["live_in"].any() and e["live_out"].any())]
