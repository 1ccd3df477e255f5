"""Table methods, one file each; importing a file registers its method (installed as ``embcompress.tables``)."""

from .full import FullEmbedding
from .hashing import HashingEmbedding, HashingEmbeddingV2
from .unified import UnifiedEmbedding, UnifiedEmbeddingV2
from .hash_embedding import HashEmbedding, HashEmbeddingV2
from .mixed_dim import MixedDimEmbedding
from .qr import QREmbedding
from .optembed import OptEmbed, OptEmbedExport
from .dhe import DeepHashEmbedding
from .cce import CCEEmbedding
from .tt_rec import TTRecEmbedding
from .robe import RobeEmbedding
from .dpq import DPQEmbedding, DPQExport
from .mgqe import MGQEEmbedding
from .alpt import ALPTEmbedding
from .dedup import DedupEmbedding, DedupExport
from .autosrh import AutoSrhEmbedding, AutoSrhExport
from .pep import PEPEmbedding, PEPExport
from .deeplight import DeepLightEmbedding, DeepLightExport
from .autodim import AutoDimEmbedding, AutoDimServed

__all__ = [
    "FullEmbedding", "HashingEmbedding", "HashingEmbeddingV2", "UnifiedEmbedding", "UnifiedEmbeddingV2",
    "HashEmbedding", "HashEmbeddingV2", "MixedDimEmbedding", "QREmbedding", "OptEmbed", "OptEmbedExport",
    "DeepHashEmbedding",
    "TTRecEmbedding",
    "RobeEmbedding",
    "CCEEmbedding",
    "DPQEmbedding", "DPQExport", "MGQEEmbedding",
    "ALPTEmbedding",
    "DedupEmbedding", "DedupExport",
    "AutoSrhEmbedding", "AutoSrhExport",
    "PEPEmbedding", "PEPExport",
    "DeepLightEmbedding", "DeepLightExport",
    "AutoDimEmbedding", "AutoDimServed",
]
