"""oes_fast: fast sparse deep image priors (Optimal Eye Surgeon, Lottery Image Prior)."""
from . import ops  # noqa: F401  (loads oes_fast._C and registers the operators)
from . import masks, models, reference, rng  # noqa: F401
from .ops import gumbel_mask

__all__ = ["gumbel_mask", "masks", "models", "reference", "rng"]
__version__ = "0.1.0"
