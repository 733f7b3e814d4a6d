"""The router's side of the uwsgi packets the tool sends (subscriptions, probes): what the
tests' fake routers and apps read. The tool itself only writes them (``uwsgi_reload``)."""

from __future__ import annotations

import struct

from uwsgi_reload import PacketError

_HEADER = struct.Struct("<BHB")
_LENGTH = struct.Struct("<H")


def decode_vars(body: bytes) -> list[tuple[str, str]]:
    """uwsgi vars: repeated [u16 LE length][key][u16 LE length][value]."""
    pairs, pos = [], 0
    while pos < len(body):
        parts = []
        for _ in range(2):
            if pos + 2 > len(body):
                raise PacketError(f"uwsgi vars truncated at byte {pos}")
            (size,) = _LENGTH.unpack_from(body, pos)
            pos += 2
            if pos + size > len(body):
                raise PacketError(f"uwsgi var of {size} bytes truncated at byte {pos}")
            parts.append(body[pos : pos + size].decode("utf-8", "replace"))
            pos += size
        pairs.append((parts[0], parts[1]))
    return pairs


def decode_packet(data: bytes) -> tuple[int, int, list[tuple[str, str]]]:
    """(modifier1, modifier2, vars) of one whole packet."""
    if len(data) < _HEADER.size:
        raise PacketError(f"a uwsgi packet has a 4-byte header, got {len(data)} bytes")
    modifier1, size, modifier2 = _HEADER.unpack_from(data)
    if len(data) - _HEADER.size != size:
        raise PacketError(f"header says {size} bytes of body, got {len(data) - _HEADER.size}")
    return modifier1, modifier2, decode_vars(data[_HEADER.size :])
