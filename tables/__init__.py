"""Table methods, one file each; importing a file registers its method (installed as ``embcompress.tables``)."""

from .full import FullEmbedding
from .hashing import HashingEmbedding

__all__ = ["FullEmbedding", "HashingEmbedding"]
