"""What makes a connection cheap, checked from the client's side of real sockets.

Every write the relay makes is a TCP segment (asyncio sets TCP_NODELAY) and a wake-up
for the client and the relay; the kernel counts the data segments a socket received
(TCP_INFO, tcpi_data_segs_in), which tells how a reply was written without timing it.
"""

from __future__ import annotations

import socket
import struct
import sys

import pytest

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="TCP_INFO is Linux's"),
]

_DATA_SEGS_IN = 152  # offset of tcpi_data_segs_in in struct tcp_info (Linux >= 4.6)


def data_segments_in(sock: socket.socket) -> int:
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
    if len(info) < _DATA_SEGS_IN + 4:
        pytest.skip("kernel without tcpi_data_segs_in")
    return struct.unpack_from("I", info, _DATA_SEGS_IN)[0]


def segments_for(client, data: bytes, replies: int) -> tuple[list[str], int]:
    """Send `data`, read `replies` whole replies: (replies, data segments they took)."""
    before = data_segments_in(client.sock)
    client.send(data)
    got = [client.reply() for _ in range(replies)]
    assert not client.buffer
    return got, data_segments_in(client.sock) - before


def test_the_segment_counter_counts_writes(relay, raw_client):
    # The method itself: two commands sent one at a time, two replies, two segments.
    client = raw_client(relay.port)
    for _ in range(2):
        replies, segments = segments_for(client, b"NOOP\r\n", 1)
        assert replies[0].startswith("250") and segments == 1


def test_ehlo_reply_is_one_write(relay, raw_client):
    client = raw_client(relay.port)
    (reply,), segments = segments_for(client, b"EHLO client.test\r\n", 1)
    lines = reply.split("\n")
    assert len(lines) >= 6 and lines[-1].startswith("250 ")
    assert "250-PIPELINING" in lines and "250 HELP" in lines
    assert segments == 1
