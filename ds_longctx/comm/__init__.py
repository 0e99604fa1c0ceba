"""Communication primitives: the Ulysses all-to-all and the ring's async point-to-point exchange."""
from .all_to_all import heads_to_seq, seq_to_heads
from .ring import RingComm

__all__ = ["seq_to_heads", "heads_to_seq", "RingComm"]
