"""Gzip for event streams: every write is flushed so each event decodes the moment it arrives."""

from __future__ import annotations

import zlib

__all__ = ["GzipStream"]

# A 4 KiB window and memLevel 4 keep a compressor near 24 KiB (zlib's defaults take ~256 KiB),
# which matters with thousands of open streams; SSE events are small, so little is lost.
_WBITS = 16 + 12  # 16+: write the gzip container, not raw zlib
_MEMLEVEL = 4
_LEVEL = 1  # the cheapest level: streams are CPU-bound long before they are bandwidth-bound


class GzipStream:
    """A gzip member written chunk by chunk, each chunk decodable on arrival."""

    __slots__ = ("_compressor",)

    def __init__(self) -> None:
        self._compressor = zlib.compressobj(_LEVEL, zlib.DEFLATED, _WBITS, _MEMLEVEL)

    def write(self, data: bytes) -> bytes:
        """Compress ``data`` and end with a sync flush, so a client can decode all of it now."""
        return self._compressor.compress(data) + self._compressor.flush(zlib.Z_SYNC_FLUSH)

    def finish(self) -> bytes:
        """The end of the gzip member (its trailer)."""
        return self._compressor.flush(zlib.Z_FINISH)
