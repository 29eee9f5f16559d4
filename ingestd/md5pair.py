"""The whole file's MD5 and its current block's, from one pass over the bytes.

Staging needs two MD5s of every byte of a file sent in blocks: the block's
(its Content-MD5 on Put Block) and the whole file's (stored on the blob). The
C accelerator ``ingestd._md5pair`` runs both MD5 chains interleaved in one
loop, at about the CPU of one hashlib pass. Figures: bench/RESULTS.md. Without
it (not built: no compiler where the package was installed) the same interface
runs two hashlib objects, with the same digests.
"""

from __future__ import annotations

import hashlib

try:
    from ingestd._md5pair import Pair as _CPair
except ImportError:  # pragma: no cover - depends on the build
    _CPair = None

ACCELERATED = _CPair is not None
"""True when the C accelerator is in use (reported in the logs and by the bench)."""


class _HashlibPair:
    """The fallback: two hashlib MD5 objects fed the same bytes."""

    def __init__(self) -> None:
        self._whole = hashlib.md5()
        self._block = hashlib.md5()

    def update(self, data) -> None:
        self._whole.update(data)
        self._block.update(data)

    def split(self) -> bytes:
        digest = self._block.digest()
        self._block = hashlib.md5()
        return digest

    def digest(self) -> bytes:
        return self._whole.digest()


class BlockOnly:
    """Only the blocks' MD5s (``APP_AZURE_PUT_MD5=false``): one hashlib chain."""

    def __init__(self) -> None:
        self._block = hashlib.md5()

    def update(self, data) -> None:
        self._block.update(data)

    def split(self) -> bytes:
        digest = self._block.digest()
        self._block = hashlib.md5()
        return digest

    def digest(self) -> None:
        return None


def pair(block_size: int, accelerated: bool | None = None):
    """An object with ``update(bytes)``, ``split() -> block MD5`` and ``digest() -> whole MD5``.

    The accelerator needs block boundaries on 64-byte boundaries (MD5's own
    block), which every size an operator would choose is; any other block
    size uses the fallback.
    """
    use_c = ACCELERATED if accelerated is None else accelerated and ACCELERATED
    if use_c and block_size % 64 == 0:
        return _CPair()
    return _HashlibPair()
