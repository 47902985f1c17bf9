"""Lightning callbacks of lightning_xai."""

from lightning_xai.callbacks.attribution_pruning import AttributionPruning
from lightning_xai.callbacks.cswap_pruning import CSWAPPruning
from lightning_xai.callbacks.lrp_compression import LRPCompression
from lightning_xai.callbacks.preservation_guard import PreservationGuard
from lightning_xai.callbacks.self_compression import SelfCompression

__all__ = ["SelfCompression", "PreservationGuard", "CSWAPPruning", "AttributionPruning", "LRPCompression"]
