"""oes_fast: fast sparse deep image priors (Optimal Eye Surgeon, Lottery Image Prior).

    model = oes_fast.models.skip_oes(seed=0)
    z = oes_fast.models.dip_input(32, 256, 256, seed=0)
    found = oes_fast.search(model, z, noisy, density=0.05, steps=20000)
    fit = oes_fast.train_sparse(model, found.mask, z, noisy, steps=4000, clean=clean)
"""
from . import ops  # noqa: F401  (loads oes_fast._C and registers the operators)
from . import allocator, images, masks, metrics, models, prune, reference, rng, tasks  # noqa: F401
from .mask_search import SearchResult, search
from .ops import gumbel_mask
from .restoration import RestoreReport, restore
from .train import TrainResult, train_dense, train_sparse

__all__ = ["restore", "RestoreReport", "gumbel_mask", "search", "SearchResult", "train_dense", "train_sparse", "TrainResult", "allocator",
           "images", "masks", "metrics", "models", "prune", "reference", "rng", "tasks"]
__version__ = "0.1.0"
