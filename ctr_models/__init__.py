"""CTR models, one file each; each takes any embedding table unchanged (installed as ``embcompress.ctr_models``)."""

from .dcn import DCN
from .dcn_v2 import DCNv2
from .deepfm import DeepFM
from .dlrm import DLRM
from .finalmlp import FinalMLP
from .fm import FactorizationMachine
from .lr import LogisticRegression
from .wide_deep import WideDeep

__all__ = [
    "DCN", "DCNv2", "DeepFM", "DLRM", "FactorizationMachine", "FinalMLP", "LogisticRegression", "WideDeep",
]
