"""Table methods, one file each; importing a file registers its method (installed as ``embcompress.tables``)."""

from .full import FullEmbedding
from .hashing import HashingEmbedding
from .unified import UnifiedEmbedding
from .hash_embedding import HashEmbedding
from .mixed_dim import MixedDimEmbedding
from .qr import QREmbedding
from .optembed import OptEmbed, OptEmbedExport

__all__ = [
    "FullEmbedding", "HashingEmbedding", "UnifiedEmbedding", "HashEmbedding", "MixedDimEmbedding", "QREmbedding",
    "OptEmbed", "OptEmbedExport",
]
