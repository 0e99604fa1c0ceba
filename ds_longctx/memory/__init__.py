"""Host memory for the FPDT offload: the pinned buffer pool and the per-chunk device/host store."""
from .chunk_store import ChunkStore, Fetched, OffloadStreams
from .host_pool import HostMemoryError, HostPool, Lease, default_pool

__all__ = ["ChunkStore", "Fetched", "OffloadStreams", "HostMemoryError", "HostPool", "Lease", "default_pool"]
