"""The relay's own DATA reader (it replaces aiosmtpd's line-by-line one): the end of
data, dot transparency, the size and line limits, and pipelined commands after it."""

import pytest

pytestmark = pytest.mark.timeout(60)

RECEIVED_HEADER_LINES = 4  # "Received: from", "\tby", "\tfor", "\tdate"


def body_as_upstream_got_it(content: bytes) -> bytes:
    return b"".join(content.splitlines(keepends=True)[RECEIVED_HEADER_LINES:])


def open_transaction(raw_client, relay):
    client = raw_client(relay.port)
    client.login()
    client.send(b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.com>\r\nDATA\r\n")
    replies = [client.reply() for _ in range(3)]
    assert [r[:3] for r in replies] == ["250", "250", "354"], replies
    return client


@pytest.mark.parametrize(("sent", "delivered"), [
    (b"", b""),  # empty message: the terminator right after DATA
    (b"a\r\n", b"a\r\n"),
    (b"..\r\n", b".\r\n"),  # a line holding one dot, stuffed
    (b"..foo\r\nbar\r\n...\r\n", b".foo\r\nbar\r\n..\r\n"),
    (b"x\r\n.\n.\r\n", None),  # bare LF before a dot is data, not the end (refused)
])
def test_end_of_data_and_transparency(relay, upstream, raw_client, sent, delivered):
    client = open_transaction(raw_client, relay)
    client.send(sent + b".\r\nNOOP\r\n")  # NOOP pipelined right behind the data
    reply = client.reply()
    assert client.reply().startswith("250")  # the NOOP, read as a command
    if delivered is None:
        assert reply.startswith("550 5.6.0"), reply
        assert upstream.messages == []
        return
    assert reply.startswith("250"), reply
    assert body_as_upstream_got_it(upstream.messages[0].content) == delivered


def test_message_over_size_limit_is_refused_after_the_data(start_relay, upstream,
                                                           raw_client):
    relay = start_relay(upstream, MAX_MESSAGE_SIZE=2000)
    client = open_transaction(raw_client, relay)
    client.send((b"y" * 900 + b"\r\n") * 10 + b".\r\nNOOP\r\n")
    assert client.reply().startswith("552")
    assert client.reply().startswith("250")
    assert upstream.messages == []


def test_line_over_998_characters_is_refused(relay, upstream, raw_client):
    client = open_transaction(raw_client, relay)
    client.send(b"z" * 1200 + b"\r\n.\r\n")
    assert client.reply().startswith("500")
    client.send(b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.com>\r\nDATA\r\n")
    assert [client.reply()[:3] for _ in range(3)] == ["250", "250", "354"]
    client.send(b"z" * 998 + b"\r\n.\r\n")  # exactly the limit is fine
    assert client.reply().startswith("250")
    assert body_as_upstream_got_it(upstream.messages[0].content) == b"z" * 998 + b"\r\n"


def test_large_message_arrives_byte_for_byte(relay, upstream, raw_client):
    lines = [bytes([65 + i % 26]) * (i % 990) for i in range(3000)]
    lines[7] = b"." + lines[7]
    body = b"\r\n".join(lines) + b"\r\n"
    stuffed = b"\r\n".join(b"." + line if line.startswith(b".") else line
                           for line in lines) + b"\r\n"
    client = open_transaction(raw_client, relay)
    client.send(stuffed + b".\r\n")
    assert client.reply().startswith("250")
    assert body_as_upstream_got_it(upstream.messages[0].content) == body
