"""flash-colsum: exact attention column statistics without the Sq x Sk matrix."""

from .ops import column_stats, flash_colsum
from .reference import naive_colsum
from .torch_backend import get_memory_budget, set_memory_budget

__version__ = "0.2.0"
__all__ = ["column_stats", "flash_colsum", "naive_colsum", "get_memory_budget", "set_memory_budget", "__version__"]
