"""embcompress: drop-in, memory-compressed embedding tables for recommender and CTR models.

>>> import torch, embcompress
>>> table = embcompress.build_table({"type": "hashing.v1", "budget_bytes": 10_000}, [1000, 500, 3], 16)
>>> table(torch.tensor([[999, 12, 2]])).shape
torch.Size([1, 3, 16])
"""

from .contract import BudgetError, CompressedEmbedding
from .memory import MemoryReport, baseline_bytes
from .registry import (
    MODELS,
    TABLES,
    RegistryError,
    SpecError,
    build_model,
    build_table,
    list_models,
    list_tables,
)
from .replace import ReplaceReport, replace_embeddings

# The built-in methods and models register themselves on import; loading them here, under the registry rather
# than from it, means a registry lookup always sees them and the registry never imports its entries.
from . import ctr_models, tables  # noqa: E402, F401  (isort: skip)

__version__ = "0.1.0"

__all__ = [
    "BudgetError",
    "CompressedEmbedding",
    "MemoryReport",
    "MODELS",
    "TABLES",
    "RegistryError",
    "ReplaceReport",
    "SpecError",
    "baseline_bytes",
    "build_model",
    "build_table",
    "list_models",
    "list_tables",
    "replace_embeddings",
]
