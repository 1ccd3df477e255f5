"""CTR models, one file each; each takes any embedding table unchanged (installed as ``embcompress.ctr_models``)."""

from .dlrm import DLRM

__all__ = ["DLRM"]
