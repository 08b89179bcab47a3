"""Thin asyncio shell over the sans-IO framing, shared by both sides of the node-proxy link."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TypeVar

from common.aio import ReadDeadline
from common.framing import MAX_FRAME_BYTES, SOFT_FRAME_BYTES, FrameDecoder, encode_frame
from common.messages import Message

READ_BYTES = 256 * 1024
T = TypeVar("T")


class FramedStream:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 max_frame_bytes: int = MAX_FRAME_BYTES) -> None:
        self.reader = reader
        self.writer = writer
        self._decoder = FrameDecoder(max_frame_bytes)
        self._ready: list[Message] = []
        self._deadline = ReadDeadline(reader)

    @property
    def max_frame_bytes(self) -> int:
        return self._decoder.max_frame_bytes

    @max_frame_bytes.setter
    def max_frame_bytes(self, limit: int) -> None:
        """Raise or lower the cap for the frames still to come (say, after a handshake)."""
        self._decoder.max_frame_bytes = limit

    async def recv_batch(self, max_silence: float) -> list[Message]:
        """Every message the next read completes (at least one); EOF raises ConnectionError,
        and `max_silence` seconds without a byte raise TimeoutError."""
        while not self._ready:
            self._deadline.start(max_silence)
            try:
                data = await self.reader.read(READ_BYTES)
            finally:
                self._deadline.stop()
            if not data:
                raise ConnectionError("peer closed the connection")
            self._ready = self._decoder.feed(data)
        batch, self._ready = self._ready, []
        return batch

    async def recv(self, max_silence: float) -> Message:
        batch = await self.recv_batch(max_silence)
        first, self._ready = batch[0], batch[1:]
        return first

    async def send(self, messages: Iterable[Message]) -> None:
        self.writer.write(b"".join(encode_frame(m) for m in messages))
        await self.writer.drain()

    def send_last(self, message: Message) -> None:
        """Queue a parting message without waiting: `aclose` sends what is queued before it
        closes. Nothing if the connection is closing already."""
        if not self.writer.is_closing():
            self.writer.write(encode_frame(message))

    async def aclose(self) -> None:
        self._deadline.close()
        self.writer.close()
        with contextlib.suppress(OSError, ConnectionError):
            await self.writer.wait_closed()


def chunk_by_size(items: Sequence[T], size_of: Callable[[T], int],
                  budget: int = SOFT_FRAME_BYTES) -> Iterator[list[T]]:
    """Split a batch so that each frame carries about `budget` bytes at most."""
    chunk: list[T] = []
    used = 0
    for item in items:
        size = size_of(item)
        if chunk and used + size > budget:
            yield chunk
            chunk, used = [], 0
        chunk.append(item)
        used += size
    if chunk:
        yield chunk
