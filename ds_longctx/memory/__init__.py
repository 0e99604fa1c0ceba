"""Host memory for the FPDT offload (the pinned buffer pool and the per-chunk device/host store) and for
checkpointed layers' inputs (:class:`CheckpointOffload`), and AdamW with its moments in host memory
(:class:`HostStateAdamW`)."""
from .checkpoint_offload import CheckpointOffload
from .chunk_store import ChunkStore, Fetched, OffloadStreams
from .host_optimizer import HostStateAdamW
from .host_pool import HostMemoryError, HostPool, Lease, default_pool

__all__ = ["CheckpointOffload", "ChunkStore", "Fetched", "OffloadStreams", "HostMemoryError", "HostPool", "HostStateAdamW", "Lease",
           "default_pool"]
