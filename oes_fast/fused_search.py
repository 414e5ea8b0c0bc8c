"""The OES search step with the fused engine (engine="fused" of oes_fast.search).

The unfused engine samples the masked weights of the whole network in one gumbel_mask launch
over the flat parameter space, writes them (a copy of every weight) and runs the network on
views of that buffer. The fused engine never materializes the masked conv weights: every
conv of the network runs as torch.ops.oes_fast.gumbel_masked_conv2d, which forms its masked
weight tiles on the fly from (logits, W0) and the random stream, and the remaining parameters
(conv biases, batch-norm weights and biases: about 0.1% of the OES network) go through the
flat gumbel_mask, one launch per contiguous run of them in the flat space.

Noise: parameter element j of the flat space gets stream offset step * numel + j in both
engines, so both sample the same masks and follow the same logits trajectory up to float
rounding (on the CPU, where the fused op is the composite gumbel_mask + pad + conv2d, to the
bit in practice; tests/test_gumbel_masked_conv2d.py checks it).

Memory (recompute=True): each block of the hourglass (DownBlock, UpBlock) runs under
activation checkpointing, so a step keeps only the blocks' inputs for the backward instead of
every conv input and batch-norm/activation tensor; the backward runs each block's forward
again, which regenerates the same masks from (seed, offset). Batch norm updates its running
statistics once per step, not again in the recomputation. It costs about one more forward.

Interfaces (for oes_fast/mask_search.py and bench/):
- FusedForward(model, layout, weights, noise_seed, tau, recompute=False)(logits, z, step) ->
  network output; replaces `functional_call(model, layout.views(gumbel_mask(logits, weights,
  seed, step * numel, tau)), (z,))` in the search loop. Running statistics of batch norm update
  the buffers of `model` itself, as with functional_call. The masks of a step stay attached to
  the network until the next call, so its backward (and recomputation) may run any time before.
The whole step (forward, backward, fused KL + Adam update) is oes_fast.mask_search.SearchStep
with engine="fused".
"""
from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .flat import FlatLayout
from .ops import gumbel_mask, gumbel_masked_conv2d

__all__ = ["FusedForward", "fusable"]


def fusable(module: nn.Module) -> bool:
    """Whether gumbel_masked_conv2d can run this conv: stride 1, no dilation or groups, square
    odd kernel, 'same' padding (reflect or zeros), float32/float64."""
    if type(module) is not nn.Conv2d:
        return False
    k = module.kernel_size[0]
    return (module.kernel_size == (k, k) and k % 2 == 1 and module.stride == (1, 1) and module.dilation == (1, 1)
            and module.groups == 1 and module.padding == ((k - 1) // 2,) * 2
            and module.padding_mode in ("reflect", "zeros") and module.weight.dtype in (torch.float32, torch.float64))


class _FusedConv2d(nn.Module):
    """Stands in for one nn.Conv2d of the network: holds no parameters, only where its weight
    lives in the flat space; the step hands it the logits / W0 views and the masked bias."""

    def __init__(self, conv: nn.Conv2d, weight_name: str, bias_name: str | None, flat_offset: int):
        super().__init__()
        self.weight_name, self.bias_name, self.flat_offset = weight_name, bias_name, flat_offset
        self.padding, self.padding_mode = conv.padding[0], conv.padding_mode
        self.state: dict | None = None  # set by FusedForward for each step, kept until the next

    def forward(self, x):
        s = self.state
        bias = s["masked"][self.bias_name] if self.bias_name is not None else None
        offset = s["base"] + self.flat_offset  # an int, or a device tensor (CUDA-graph step)
        if isinstance(offset, torch.Tensor):
            return _MaskedConvAt.apply(x, s["logits"][self.weight_name], s["weights"][self.weight_name], bias,
                                       s["seed"], offset, s["tau"], self.padding, self.padding_mode)
        return gumbel_masked_conv2d(x, s["logits"][self.weight_name], s["weights"][self.weight_name], bias,
                                    s["seed"], offset, s["tau"], self.padding, self.padding_mode)


class _MaskAt(torch.autograd.Function):
    """gumbel_mask (differentiable in the logits) with its offset in a 0-d device tensor, on the
    Triton kernels directly (the op's schema takes an int): for the CUDA-graph step."""

    @staticmethod
    def forward(ctx, logits, weight, seed, offset, tau):
        from .kernels import gumbel_mask as kernels

        ctx.save_for_backward(logits, weight, offset)
        ctx.args = (seed, tau)
        return kernels.gumbel_mask_forward(logits, weight, seed, offset, tau)

    @staticmethod
    def backward(ctx, grad):
        from .kernels import gumbel_mask as kernels

        logits, weight, offset = ctx.saved_tensors
        seed, tau = ctx.args
        grad_logits = kernels.gumbel_mask_backward(grad.contiguous(), logits, weight, seed, offset, tau, False)[0]
        return grad_logits, None, None, None, None


class _MaskedConvAt(torch.autograd.Function):
    """gumbel_masked_conv2d with its offset in a 0-d device tensor, on the Triton kernels: for
    the CUDA-graph step."""

    @staticmethod
    def forward(ctx, x, logits, weight, bias, seed, offset, tau, padding, padding_mode):
        from .kernels import gumbel_masked_conv2d as kernels

        ctx.save_for_backward(x, logits, weight, offset)
        ctx.args, ctx.has_bias = (seed, tau, padding, padding_mode), bias is not None
        return kernels.gumbel_masked_conv2d_forward(x, logits, weight, bias, seed, offset, tau, padding, padding_mode)

    @staticmethod
    def backward(ctx, grad):
        from .kernels import gumbel_masked_conv2d as kernels

        x, logits, weight, offset = ctx.saved_tensors
        need = [bool(ctx.needs_input_grad[i]) for i in range(3)] + [ctx.has_bias and bool(ctx.needs_input_grad[3])]
        grads = kernels.gumbel_masked_conv2d_backward(grad.contiguous(), x, logits, weight, ctx.args[0], offset,
                                                      *ctx.args[1:], need)
        return tuple(g if want else None for g, want in zip(grads, need)) + (None,) * 5


@dataclass(frozen=True)
class _Segment:
    start: int
    end: int
    names: tuple[str, ...]
    fused: bool  # one fused conv weight, or a run of flat-masked parameters


class FusedForward:
    """forward(logits, z, step): the network's output with the masks of `step` (see module doc)."""

    def __init__(self, model: nn.Module, layout: FlatLayout, weights: torch.Tensor, noise_seed: int, tau: float,
                 recompute: bool = False):
        self.layout, self.noise_seed, self.tau = layout, int(noise_seed), float(tau)
        start = dict(zip(layout.names, layout.offsets))
        # a copy of the module tree whose fusable convs are replaced (their weights not copied:
        # each conv is swapped out before the deep copy sees it); buffers stay shared with
        # `model` so batch-norm running statistics update the caller's model, as functional_call does
        fused_weights = set()
        replacements = {}
        for name, module in model.named_modules():
            if fusable(module):
                prefix = f"{name}." if name else ""
                wname = prefix + "weight"
                bname = prefix + "bias" if module.bias is not None else None
                replacements[name] = _FusedConv2d(module, wname, bname, start[wname])
                fused_weights.add(wname)
        self.net = _copy_with(model, replacements)
        self.fused = [m for m in self.net.modules() if isinstance(m, _FusedConv2d)]
        # the copy's remaining parameters become plain attributes that each step sets to its
        # masked tensors (functional_call would put the unmasked ones back when the forward
        # returns, before a recomputation in the backward could use them)
        self.attached = {}
        for name, _ in list(self.net.named_parameters()):
            owner_name, _, attr = name.rpartition(".")
            owner = self.net.get_submodule(owner_name)
            del owner._parameters[attr]
            self.attached[name] = (owner, attr)
        if recompute:
            _recompute_blocks(self.net)
        # segments of the flat space in order: each fused conv weight alone, runs of the rest merged
        segments: list[_Segment] = []
        for name, offset, shape in zip(layout.names, layout.offsets, layout.shapes):
            end = offset + shape.numel()
            if name in fused_weights:
                segments.append(_Segment(offset, end, (name,), True))
            elif segments and not segments[-1].fused:
                last = segments[-1]
                segments[-1] = _Segment(last.start, end, last.names + (name,), False)
            else:
                segments.append(_Segment(offset, end, (name,), False))
        self.segments = tuple(segments)
        self.sizes = [s.end - s.start for s in segments]
        shapes = dict(zip(layout.names, layout.shapes))
        self.shapes = shapes
        # W0 per segment, split once (views of `weights`)
        self.weight_views = {}
        for seg, piece in zip(self.segments, torch.split(weights, self.sizes)):
            self.weight_views[seg] = piece
        self.fused_weight = {seg.names[0]: piece.view(shapes[seg.names[0]])
                             for seg, piece in self.weight_views.items() if seg.fused}

    def masked_rest(self, logits: torch.Tensor, base):
        """(per-parameter logit views of the fused conv weights, masked non-conv parameters) for
        the stream offset `base` (an int, or a 0-d device tensor: the CUDA-graph step)."""
        # one split: its backward is a single cat into the logits' gradient
        logit_views, masked = {}, {}
        for seg, piece in zip(self.segments, torch.split(logits, self.sizes)):
            if seg.fused:
                logit_views[seg.names[0]] = piece.view(self.shapes[seg.names[0]])
                continue
            if isinstance(base, torch.Tensor):
                m = _MaskAt.apply(piece, self.weight_views[seg], self.noise_seed, base + seg.start, self.tau)
            else:
                m = gumbel_mask(piece, self.weight_views[seg], self.noise_seed, base + seg.start, self.tau)
            for name, part in zip(seg.names, torch.split(m, [self.shapes[n].numel() for n in seg.names])):
                masked[name] = part.view(self.shapes[name])
        return logit_views, masked

    def __call__(self, logits: torch.Tensor, z: torch.Tensor, step: int) -> torch.Tensor:
        return self.forward_at(logits, z, int(step) * self.layout.numel)

    def forward_at(self, logits: torch.Tensor, z: torch.Tensor, base) -> torch.Tensor:
        """The output with the masks drawn at stream offset `base` (step * numel): an int, or a
        0-d int64 device tensor read by the Triton kernels, so a CUDA graph can replay it."""
        logit_views, masked = self.masked_rest(logits, base)
        state = dict(logits=logit_views, weights=self.fused_weight, masked=masked, seed=self.noise_seed, base=base,
                     tau=self.tau)
        for module in self.fused:
            module.state = state
        for name, (owner, attr) in self.attached.items():
            setattr(owner, attr, masked[name])
        return self.net(z)


def _recompute_blocks(net: nn.Module) -> None:
    """Run every hourglass block of `net` under activation checkpointing (see module doc)."""
    from .models.skip import DownBlock, UpBlock

    blocks = [m for m in net.modules() if isinstance(m, (DownBlock, UpBlock))]
    if not blocks:
        raise ValueError(f"recompute: {type(net).__name__} has no hourglass blocks to recompute (only the skip "
                         "network is supported)")
    for block in blocks:
        block.forward = _Recomputed(block)


class _Recomputed:
    """A block's forward that saves only its inputs; the backward runs it again and then puts
    back batch norm's running statistics (the first run updated them already)."""

    def __init__(self, block: nn.Module):
        self.forward = block.forward
        self.buffers = [b for m in block.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
                        for b in m.buffers()]

    def __call__(self, *args):
        return checkpoint(self.forward, *args, use_reentrant=False,
                          context_fn=lambda: (contextlib.nullcontext(), self._statistics_kept()))

    @contextlib.contextmanager
    def _statistics_kept(self):
        kept = [b.clone() for b in self.buffers]
        try:
            yield
        finally:
            with torch.no_grad():
                for b, k in zip(self.buffers, kept):
                    b.copy_(k)


def _copy_with(model: nn.Module, replacements: dict[str, nn.Module]) -> nn.Module:
    """Deep copy of `model` with the named submodules replaced and buffers shared, without
    copying the replaced modules' parameters."""
    originals = {}
    for name, new in replacements.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        originals[name] = (parent, child, parent._modules[child])
        parent._modules[child] = new
    try:
        memo = {id(b): b for b in model.buffers()}  # deepcopy keeps these very tensors
        return copy.deepcopy(model, memo)
    finally:
        for parent, child, old in originals.values():
            parent._modules[child] = old
