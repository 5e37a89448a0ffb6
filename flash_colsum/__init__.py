"""flash-colsum: exact attention column statistics without the Sq x Sk matrix."""

from .attention import attention_with_lse
from .ops import column_stats, flash_colsum
from .reference import naive_colsum
from .selection import pool_scores, select_topk
from .torch_backend import get_memory_budget, set_memory_budget

__version__ = "0.2.0"
__all__ = [
    "column_stats", "flash_colsum", "naive_colsum", "attention_with_lse", "pool_scores", "select_topk",
    "get_memory_budget", "set_memory_budget", "__version__",
]
