"""One OES mask-search step on the CPU, against what a user would otherwise run.

Run: python -m pytest bench/bench_search_step.py --benchmark-only --benchmark-json out.json
then python bench/report.py out.json.

Per image size (256 and 512 square, the OES network, 3,008,867 parameters):
  search_step    oes_fast's step: ONE gumbel_mask_with_slope launch over the flat parameters
                 (masked weights and their slope in the logits), the generator on views of
                 that buffer (the activations in oes_fast.loop.network_input's layout:
                 channels-last where the CPU has AVX-512, else contiguous), then ONE pass for
                 the logits: chain rule with the saved slope, KL prior, Adam
  dense_step     one plain dense DIP training step of the same network (forward, backward,
                 Adam over all weights): the cost floor a search step is held to (target 1.2x)
  dense_step_channels_last
                 the same on channels-last activations, the layout oes_fast's CPU loops use
                 with AVX-512 (dense_step's is theirs elsewhere): the faster of the two dense
                 steps is the cost floor
  authors_step   the authors'-style step: deep copy of the model, a two-class Gumbel-softmax
                 per parameter tensor, multiply, forward, backward, Adam (target: 4x slower
                 than search_step at 256)
"""
import copy
import os

import pytest
import torch
import torch.nn.functional as F

import oes_fast
from oes_fast.mask_search import SearchStep as OesSearchStep
from oes_fast.allocator import keep_freed_memory
from oes_fast.reference import KL_EPS

ROUNDS = int(os.environ.get("OES_BENCH_ROUNDS", "5"))
TAU, KL, DENSITY, LR = 0.2, 1e-9, 0.05, 0.01
SIZES = [int(s) for s in os.environ.get("OES_BENCH_SIZES", "256,512").split(",")]
# OES_BENCH_KEEP_FREED_MEMORY=1: every step with glibc keeping freed memory, as the oes-fast
# command runs (oes_fast/allocator.py); bench/conftest.py sets it before any benchmark runs
KEEP_FREED_MEMORY = os.environ.get("OES_BENCH_KEEP_FREED_MEMORY") == "1" and keep_freed_memory()


def problem(size):
    model = oes_fast.models.skip_oes(seed=0)
    z = oes_fast.models.dip_input(32, size, size, seed=0)
    y = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    return model, z, y


class SearchStep:
    """oes_fast.search's step (oes_fast.mask_search.SearchStep), one step per call."""

    def __init__(self, model, z, y):
        self.run, self.step = OesSearchStep(model, z, y, density=DENSITY, lr=LR, tau=TAU, kl=KL), 0

    def __call__(self):
        self.run(self.step)
        self.step += 1


class DenseStep:
    def __init__(self, model, z, y):
        self.model, self.z, self.y = copy.deepcopy(model), z, y
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=LR)

    def __call__(self):
        self.optimizer.zero_grad(set_to_none=False)
        loss = torch.mean((self.model(self.z) - self.y) ** 2)
        loss.backward()
        self.optimizer.step()


class DenseStepChannelsLast(DenseStep):
    """The same dense step on channels-last activations, as oes_fast.train_dense runs it on a
    CPU with AVX-512 (oes_fast.loop.network_input; contiguous elsewhere, as DenseStep)."""

    def __init__(self, model, z, y):
        super().__init__(model, z.contiguous(memory_format=torch.channels_last), y)


class AuthorsStep:
    """As the OES authors' code does it: one logit tensor per parameter, a fresh deep copy of
    the network per step whose parameters are replaced by W0 * a two-class Gumbel-softmax."""

    def __init__(self, model, z, y):
        self.model, self.z, self.y = model, z, y
        self.logits = {n: torch.zeros_like(p, requires_grad=True) for n, p in model.named_parameters()}
        self.w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
        self.optimizer = torch.optim.Adam(self.logits.values(), lr=LR)

    def __call__(self):
        self.optimizer.zero_grad(set_to_none=False)
        net = copy.deepcopy(self.model)
        prior = 0.0
        for name, module in list(net.named_modules()):
            for pname in list(module._parameters):
                full = f"{name}.{pname}" if name else pname
                s = torch.sigmoid(self.logits[full])
                two_class = torch.stack([torch.log(s), torch.log(1 - s)], dim=-1)
                m = F.gumbel_softmax(two_class, tau=TAU, hard=False)[..., 0]
                del module._parameters[pname]
                setattr(module, pname, self.w0[full] * m)
                prior = prior + (s * torch.log((s + KL_EPS) / DENSITY)
                                 + (1 - s) * torch.log((1 - s + KL_EPS) / (1 - DENSITY))).sum()
        loss = torch.mean((net(self.z) - self.y) ** 2) + KL * prior
        loss.backward()
        self.optimizer.step()


MEMORY_VARIANTS = ("authors", "unfused", "fused", "recompute")


def memory_variant_step(variant, model, z, y):
    """step(i) of one of MEMORY_VARIANTS (bench/memory_cpu.py, bench/memory_estimate.py): the
    authors'-style step, or oes_fast's step with engine "unfused", "fused", or "fused" with
    recompute=True."""
    if variant == "authors":
        run = AuthorsStep(model, z, y)
        return lambda i: run()
    if variant not in MEMORY_VARIANTS:
        raise ValueError(f"variant must be one of {MEMORY_VARIANTS}, got {variant!r}")
    return OesSearchStep(model, z, y, density=DENSITY, lr=LR, tau=TAU, kl=KL,
                         engine="unfused" if variant == "unfused" else "fused", recompute=variant == "recompute")


STEPS = {"search_step": SearchStep, "dense_step": DenseStep, "dense_step_channels_last": DenseStepChannelsLast,
         "authors_step": AuthorsStep}


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("method", list(STEPS))
def test_step(benchmark, method, size):
    step = STEPS[method](*problem(size))
    threads = torch.get_num_threads()
    benchmark.group = (f"search step {size}x{size}, {threads} thread{'s' if threads > 1 else ''}"
                       + (", freed memory kept" if KEEP_FREED_MEMORY else ""))
    benchmark.extra_info.update(method=method, group=benchmark.group, size=size, baseline=method == "dense_step",
                                keep_freed_memory=bool(KEEP_FREED_MEMORY),
                                torch_threads=torch.get_num_threads(), load_average_before=os.getloadavg()[0])
    benchmark.pedantic(step, rounds=ROUNDS, warmup_rounds=3, iterations=1)
    benchmark.extra_info["load_average_after"] = os.getloadavg()[0]
