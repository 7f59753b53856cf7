"""growop: grow a layer's outputs while it trains, in place.

``GrowLinear`` allocates ``capacity`` rows once and a mask says which are live; adding
output nodes unmasks rows, so the Parameters, the optimizer's state, DDP and compiled
graphs stay as they are. Compute follows the live rows, not the capacity.
"""

from growop import ops
from growop.embedding import GrowEmbedding
from growop.functional import linear_cross_entropy, masked_linear
from growop.modules import GrowLinear, default_capacity
from growop.ops import get_strategy, strategy
from growop.rows import grow_together, tie

__all__ = [
    "GrowEmbedding",
    "GrowLinear",
    "default_capacity",
    "get_strategy",
    "grow_together",
    "linear_cross_entropy",
    "masked_linear",
    "ops",
    "strategy",
    "tie",
]
__version__ = "0.1.0"
