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

from relay.policy import long_line_in
from relay.settings import load_config
from relay.upstream import UpstreamCalls
from smtp_relay import SMTPRelayServer

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


def in_process_config(tmp_path, **overrides: str):
    return load_config({
        "SMTP_AUTH_USERNAME": "user", "SMTP_AUTH_PASSWORD": "pw-0123456789",
        "ALLOWED_FROM_DOMAINS": "example.com", "ALLOWED_TO_DOMAINS": "example.com",
        "LISTEN_HOST": "127.0.0.1", "LISTEN_PORT": "0", "RELAY_HOST": "127.0.0.1",
        "LOG_FILE": str(tmp_path / "relay.log"), **overrides})


def test_commands_do_not_each_make_a_timer(tmp_path):
    # The idle timer counts from the last command (session.active_at) and re-arms
    # itself when it fires early, so a command only moves that clock: one timer per
    # connection, not a call_later and a cancel per command.
    import asyncio


    async def run() -> tuple[int, list[str]]:
        server = SMTPRelayServer(in_process_config(tmp_path))
        await server.start()
        loop = asyncio.get_running_loop()
        timers = 0
        call_later = loop.call_later

        def counting(*args, **kwargs):
            nonlocal timers
            timers += 1
            return call_later(*args, **kwargs)
        loop.call_later = counting
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            replies = [(await reader.readline()).decode()]
            writer.write(b"NOOP\r\n" * 20 + b"QUIT\r\n")
            while line := await reader.readline():
                replies.append(line.decode())
            writer.close()
            return timers, replies
        finally:
            loop.call_later = call_later
            await server.stop()

    timers, replies = asyncio.run(run())
    assert replies[0].startswith("220") and replies[-1].startswith("221")
    assert [r[:3] for r in replies[1:-1]] == ["250"] * 20
    assert timers == 1


def test_idle_client_is_still_told_and_dropped(tmp_path):
    # ...and it still fires: TIMEOUT after the last command, not after the first.
    import asyncio
    import time


    async def run() -> tuple[float, list[str]]:
        server = SMTPRelayServer(in_process_config(tmp_path, TIMEOUT="1"))
        await server.start()
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            replies = [(await reader.readline()).decode()]
            # Authenticated: otherwise TIMEOUT counts from the greeting, commands or not.
            writer.write(b"EHLO client.test\r\nAUTH PLAIN AHVzZXIAcHctMDEyMzQ1Njc4OQ==\r\n")
            while not (line := await reader.readline()).startswith(b"250 "):
                pass
            assert (await reader.readline()).startswith(b"235")
            for _ in range(3):  # 1.5 s of commands: past the first timer's deadline
                await asyncio.sleep(0.5)
                writer.write(b"NOOP\r\n")
                replies.append((await reader.readline()).decode())
            last = time.monotonic()
            while line := await reader.readline():
                replies.append(line.decode())
            writer.close()
            return time.monotonic() - last, replies
        finally:
            await server.stop()

    idle, replies = asyncio.run(run())
    assert [r[:3] for r in replies] == ["220", "250", "250", "250", "421"], replies
    assert "Idle timeout" in replies[-1]
    assert idle >= 0.9  # never before TIMEOUT of silence (no upper bound: loaded CI)


# RFC 2920 3.2: a server may keep the replies to RSET, MAIL and RCPT while more of the
# client's pipelined group is waiting to be read, and send them with the next reply;
# it must never wait for the client with a reply unsent.

def test_pipelined_group_is_answered_in_one_write(relay, raw_client):
    client = raw_client(relay.port)
    client.login()
    replies, segments = segments_for(
        client, b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.com>\r\nDATA\r\n", 3)
    assert [r[:3] for r in replies] == ["250", "250", "354"], replies
    assert segments == 1
    client.send(b"Subject: x\r\n\r\nbody\r\n.\r\n")
    assert client.reply().startswith("250")


def test_refusals_in_a_group_keep_their_order(relay, upstream, raw_client):
    client = raw_client(relay.port)
    client.login()
    replies, segments = segments_for(
        client, b"RSET\r\nMAIL FROM:<a@example.net>\r\nRCPT TO:<b@example.com>\r\n"
        b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@elsewhere.test>\r\n"
        b"RCPT TO:<c@example.com>\r\nNOOP\r\n", 7)
    assert [r[:3] for r in replies] == ["250", "553", "503", "250", "550", "250", "250"]
    assert segments == 1
    assert upstream.messages == []


def test_a_reply_is_not_kept_from_a_client_that_waits(relay, raw_client):
    # Nothing more is pipelined: each reply goes out at once.
    client = raw_client(relay.port)
    client.login()
    for line in (b"MAIL FROM:<a@example.com>", b"RCPT TO:<b@example.com>", b"RSET"):
        (reply,), segments = segments_for(client, line + b"\r\n", 1)
        assert reply.startswith("250") and segments == 1


def test_a_kept_reply_goes_out_before_a_hang_up(start_relay, upstream, raw_client):
    # RSET's reply is kept while the pipelined AUTH is checked; the lock-out that
    # AUTH causes hangs up, and the client still gets both replies, in order.
    relay = start_relay(upstream, AUTH_MAX_FAILURES="1", AUTH_FAILURE_DELAY="0")
    client = raw_client(relay.port)
    assert client.command("EHLO client.test").startswith("250")
    client.send(b"RSET\r\nAUTH PLAIN AHVzZXIAd3Jvbmc=\r\n")  # \0user\0wrong
    assert client.reply().startswith("250")
    assert client.reply().startswith("421 4.7.0")
    assert client.closed()



def test_a_kept_reply_goes_out_before_starttls(start_relay, upstream, raw_client,
                                               server_cert):
    # Nothing from before TLS may come out inside it. (With USE_TLS, RSET, MAIL and
    # RCPT are refused before STARTTLS, outside smtp_RSET: that reply is not kept.)
    import ssl

    cert_file, key_file, ca_file = server_cert
    relay = start_relay(upstream, USE_TLS="true", TLS_CERT_FILE=cert_file,
                        TLS_KEY_FILE=key_file)
    client = raw_client(relay.port)
    assert client.command("EHLO client.test").startswith("250")
    replies, _ = segments_for(client, b"RSET\r\nSTARTTLS\r\nNOOP\r\n", 2)
    assert replies == ["530 Must issue a STARTTLS command first",
                       "220 Ready to start TLS"]
    context = ssl.create_default_context(cafile=str(ca_file))
    client.sock = context.wrap_socket(client.sock, server_hostname="localhost")
    assert client.command("NOOP") == "250 OK"  # the pipelined NOOP was dropped
    assert client.command("RSET") == "250 2.0.0 OK"

# The upstream calls of client transactions (MAIL, RCPT, DATA: three a message) run in
# the relay's own worker threads: run_in_executor costs ~25 us more per call.

def test_upstream_calls_return_results_and_raise_errors():
    import asyncio
    import threading


    def fail() -> None:
        raise OSError("link gone")

    async def run() -> tuple[list, str, bool]:
        calls = UpstreamCalls(limit=3)
        try:
            results = await asyncio.gather(*(
                calls.submit(lambda n=n: (n, threading.current_thread().name))
                for n in range(10)))
            with pytest.raises(OSError, match="link gone"):
                await calls.submit(fail)
            return results, threading.current_thread().name, calls.threads <= 3
        finally:
            calls.close()

    results, loop_thread, bounded = asyncio.run(run())
    assert [n for n, _ in results] == list(range(10))
    assert all(name.startswith("upstream") and name != loop_thread for _, name in results)
    assert bounded


def test_upstream_calls_beyond_the_limit_wait_and_close_cancels_them():
    import asyncio
    import threading


    release = threading.Event()

    async def run() -> tuple[bool, bool, int]:
        calls = UpstreamCalls(limit=1)
        first = calls.submit(release.wait, 30)
        second = calls.submit(lambda: "second")
        await asyncio.sleep(0.2)
        waiting = not first.done() and not second.done()  # one thread, busy
        calls.close()
        release.set()
        assert await first is True  # a call under way finishes
        return waiting, second.cancelled(), calls.threads

    waiting, cancelled, threads = asyncio.run(run())
    assert waiting and cancelled and threads == 1


def test_an_abandoned_upstream_call_still_finishes_for_the_pool(relay, upstream,
                                                                raw_client):
    # The client leaves while RCPT waits on a slow upstream: the call runs to its end,
    # then the session is reset upstream and the next client's message reuses it.
    import time

    upstream.handler.stall = {"RCPT": 1.5}
    client = raw_client(relay.port)
    client.login()
    assert client.command("MAIL FROM:<a@example.com>").startswith("250")
    client.send(b"RCPT TO:<b@example.com>\r\n")
    time.sleep(0.3)  # the RCPT is at the upstream
    client.close()
    deadline = time.monotonic() + 20
    while upstream.handler.rset_count < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert upstream.handler.rset_count == 1
    upstream.handler.stall = {}
    time.sleep(0.3)  # pooled once the upstream answered RSET
    client = raw_client(relay.port)
    client.login()
    replies, _ = segments_for(
        client, b"MAIL FROM:<a@example.com>\r\nRCPT TO:<c@example.com>\r\nDATA\r\n", 3)
    assert [r[:3] for r in replies] == ["250", "250", "354"]
    assert client.command(b"Subject: x\r\n\r\nbody\r\n.").startswith("250")
    assert [m.rcpt_tos for m in upstream.messages] == [["c@example.com"]]
    assert len(upstream.handler.sessions) == 1  # one upstream session for both


# The long-line check on DATA: the same verdict as the regular expression it replaces
# (a line, from the data's start or an LF, with 999 bytes before any CR or LF), which
# tried a match at every byte (1 ms per 100 KB, a third of a 100 KB message's CPU).

def _long_line_regex(limit: int):
    import re
    return re.compile(rb"^[^\r\n]{%d}" % limit, re.MULTILINE)


@pytest.mark.parametrize("limit", [1, 2, 3, 7, 999])
def test_long_line_scan_agrees_with_the_regex(limit):
    from hypothesis import given, settings
    from hypothesis import strategies as st


    regex = _long_line_regex(limit)
    pieces = st.sampled_from([b"a", b"b" * limit, b"c" * (limit - 1), b"\r\n", b"\r",
                              b"\n", b"\n\r", b"." ])

    @settings(max_examples=400, deadline=None)
    @given(st.lists(pieces, max_size=40).map(b"".join))
    def agrees(data: bytes) -> None:
        assert long_line_in(data, limit) == (regex.search(data) is not None)

    agrees()


def test_long_line_scan_examples():

    line = b"x" * 76 + b"\r\n"
    assert not long_line_in(line * 1400, 999)
    assert not long_line_in(b"y" * 998 + b"\r\n", 999)
    assert long_line_in(line * 700 + b"y" * 999 + b"\r\n" + line, 999)
    assert long_line_in(b"y" * 999, 999)  # the last line, no CRLF yet
    assert not long_line_in(b"y" * 500 + b"\r" + b"y" * 600, 999)
    assert long_line_in(b"ab\r\n" * 250_000 + b"z" * 5000, 999)


def test_commands_do_not_push_back_the_auth_deadline(tmp_path):
    # One timer a connection still cuts off a client that never authenticates TIMEOUT
    # after the greeting, however busy it keeps the connection.
    import asyncio
    import time


    async def run() -> tuple[float, list[str]]:
        server = SMTPRelayServer(in_process_config(tmp_path, TIMEOUT="1"))
        await server.start()
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            replies = [(await reader.readline()).decode()]
            greeted = time.monotonic()
            while time.monotonic() - greeted < 10:
                writer.write(b"NOOP\r\n")
                line = await reader.readline()
                replies.append(line.decode())
                if not line.startswith(b"250"):
                    break
                await asyncio.sleep(0.2)
            writer.close()
            return time.monotonic() - greeted, replies
        finally:
            await server.stop()

    elapsed, replies = asyncio.run(run())
    assert replies[-1].startswith("421 4.7.0 No AUTH within 1 s"), replies
    assert 0.9 <= elapsed < 10
