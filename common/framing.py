"""Sans-IO framing: a 4-byte big-endian length, then a msgpack body. No asyncio here.

`FrameDecoder.feed` takes bytes in any chunking and returns the whole messages they
complete. A frame announced larger than `MAX_FRAME_BYTES`, or a body that is not a
valid message, raises `RemoteProtocolError`: the caller closes that connection.
"""

from __future__ import annotations

import struct

import msgpack

from common.errors import FrameTooLarge, LocalProtocolError, RemoteProtocolError
from common.messages import MAX_ITEMS, Message, from_wire, to_wire
from common.packer import pack

# The largest batch a sender builds is ~1 MiB (see SOFT_FRAME_BYTES); 16 MiB leaves room for
# one huge job result and still bounds what a hostile peer can make us buffer.
MAX_FRAME_BYTES = 16 * 1024 * 1024
# Senders split batches so that a frame stays around this size.
SOFT_FRAME_BYTES = 1024 * 1024
HEADER = struct.Struct(">I")
# A message is a map of a few fields; only lists are long (MAX_ITEMS, checked again by the
# message decoders). Capping both in msgpack itself refuses a hostile "array of 16 million"
# header before a single element is built. Nesting deeper than msgpack's own stack limit
# raises StackError, which is caught below like any other garbage.
MAX_MAP_LEN = 64


def encode_frame(msg: Message) -> bytes:
    body = pack(to_wire(msg))
    if len(body) > MAX_FRAME_BYTES:
        raise LocalProtocolError(f"frame of {len(body)} bytes exceeds {MAX_FRAME_BYTES}")
    return HEADER.pack(len(body)) + body


def decode_body(body: bytes) -> Message:
    try:
        obj = msgpack.unpackb(body, raw=False, strict_map_key=True, use_list=True,
                              max_array_len=MAX_ITEMS, max_map_len=MAX_MAP_LEN)
    except Exception as exc:  # msgpack raises many types for garbage; all mean the same
        raise RemoteProtocolError(f"undecodable frame body: {type(exc).__name__}") from exc
    return from_wire(obj)


class FrameDecoder:
    def __init__(self, max_frame_bytes: int = MAX_FRAME_BYTES) -> None:
        self._buffer = bytearray()
        self.max_frame_bytes = max_frame_bytes

    def feed(self, data: bytes) -> list[Message]:
        self._buffer += data
        messages: list[Message] = []
        while len(self._buffer) >= HEADER.size:
            (length,) = HEADER.unpack_from(self._buffer)
            if length > self.max_frame_bytes:
                raise FrameTooLarge(f"frame of {length} bytes announced, "
                                    f"limit {self.max_frame_bytes}")
            end = HEADER.size + length
            if len(self._buffer) < end:
                break
            body = bytes(self._buffer[HEADER.size:end])
            del self._buffer[:end]
            messages.append(decode_body(body))
        return messages

    @property
    def buffered(self) -> int:
        """Bytes of an incomplete frame still waiting for the rest."""
        return len(self._buffer)
