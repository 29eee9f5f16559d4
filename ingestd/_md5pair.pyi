"""Type stub for the optional C accelerator built from ingestd/_md5pair.c."""

from _typeshed import ReadableBuffer

class Pair:
    """The whole file's MD5 and its current block's, computed in one pass."""

    def __init__(self) -> None: ...
    def update(self, data: ReadableBuffer, /) -> None:
        """Feed bytes to both MD5s (the whole file's and the current block's)."""
    def split(self) -> bytes:
        """The current block's MD5; the next bytes start a new block."""
    def digest(self) -> bytes:
        """The MD5 of every byte fed so far."""
