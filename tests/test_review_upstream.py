"""The upstream side after review: upstreams that misbehave in ways aiosmtpd will not.

`RawUpstream` is a line-level SMTP server in threads on 127.0.0.1, scripted per test:
it answers the DATA command itself with a refusal (as Postfix's smtpd_data_restrictions
do, the transaction left open), answers MAIL with 251, reads the data slowly or not at
all, stalls its reply after the final dot, or answers with codes outside 200-599. It
refuses a nested MAIL with 503 as a real MTA does, and counts it.

Covered:
- no pooled session goes back with a transaction open (the next client's MAIL would
  get `503 nested MAIL command`, a permanent error);
- the time to upload the data is bounded by TIMEOUT without progress, not in total;
- every message ends with exactly one `delivered` or `delivery-failed` line, even when
  the client leaves while the upstream is still answering;
- an upstream reply code outside 200-599 never reaches the client.
"""

from __future__ import annotations

import re
import socket
import threading
import time
import urllib.request

import pytest
from conftest import free_port, message

pytestmark = pytest.mark.timeout(90)

SENDER = "app@example.com"
RECIPIENT = "ops@example.com"
RELAY_ID = re.compile(r"\(smtp-relay id ([0-9a-f]{16})\)")


# ---------------------------------------------------------------------------------------
# A scripted raw upstream
# ---------------------------------------------------------------------------------------

class RawUpstream:
    """A minimal SMTP server, one thread per connection. Scripted replies are queues:
    each MAIL / RCPT / DATA command / final dot takes the next one, else the normal
    answer."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.mail_replies: list[str] = []
        self.rcpt_replies: list[str] = []
        self.data_command_replies: list[str] = []  # instead of 354
        self.final_replies: list[str] = []  # after the final dot, instead of 250
        self.final_stall = 0.0  # seconds before answering the final dot
        self.read_rate: float | None = None  # bytes per second while reading the data
        self.stop_reading = False  # after 354, read nothing more
        self.messages: list[bytes] = []
        self.commands: list[str] = []  # verbs, in order, over all connections
        self.nested_mail = 0
        self.connections = 0
        self.closed = 0
        self.reading_stopped = threading.Event()
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _next(self, queue: list[str], default: str) -> str:
        with self.lock:
            return queue.pop(0) if queue else default

    def _accept(self) -> None:
        while not self.stopping.is_set():
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            with self.lock:
                self.connections += 1
                self._sockets.append(sock)
            threading.Thread(target=self._serve, args=(sock,), daemon=True).start()

    def _serve(self, sock: socket.socket) -> None:
        try:
            self._session(_Lines(sock))
        except OSError:
            pass
        finally:
            with self.lock:
                self.closed += 1
            sock.close()

    def _session(self, lines: _Lines) -> None:
        lines.send("220 raw.test ESMTP")
        in_transaction = recipients = 0
        while True:
            line = lines.line()
            if line is None:
                return
            verb = line.split(" ", 1)[0].upper()
            with self.lock:
                self.commands.append(verb)
            if verb in ("EHLO", "HELO"):
                lines.send("250-raw.test\r\n250-8BITMIME\r\n250 PIPELINING")
            elif verb == "MAIL":
                if in_transaction:
                    with self.lock:
                        self.nested_mail += 1
                    lines.send("503 5.5.1 Error: nested MAIL command")
                    continue
                reply = self._next(self.mail_replies, "250 2.1.0 Ok")
                in_transaction, recipients = reply[:1] == "2", 0
                lines.send(reply)
            elif verb == "RCPT":
                if not in_transaction:
                    lines.send("503 5.5.1 Error: need MAIL command")
                    continue
                reply = self._next(self.rcpt_replies, "250 2.1.5 Ok")
                recipients += reply[:1] == "2"
                lines.send(reply)
            elif verb == "DATA":
                if not recipients:
                    lines.send("503 5.5.1 Error: need RCPT command")
                    continue
                reply = self._next(self.data_command_replies, "354 End data with .")
                lines.send(reply)
                if not reply.startswith("354"):
                    continue  # refused before the data: the transaction stays open
                if self.stop_reading:
                    self.reading_stopped.set()
                    self.stopping.wait()
                    return
                data = lines.data(self.read_rate)
                if data is None:
                    return
                if self.final_stall:
                    time.sleep(self.final_stall)
                reply = self._next(self.final_replies, "")
                if not reply:
                    with self.lock:
                        self.messages.append(data)
                        reply = f"250 2.0.0 Ok: queued as RAW{len(self.messages)}"
                in_transaction = recipients = 0
                lines.send(reply)
            elif verb == "RSET":
                in_transaction = recipients = 0
                lines.send("250 2.0.0 Ok")
            elif verb == "NOOP":
                lines.send("250 2.0.0 Ok")
            elif verb == "QUIT":
                lines.send("221 2.0.0 Bye")
                return
            else:
                lines.send("502 5.5.2 Error: command not recognized")

    def wait_closed(self, count: int, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.closed >= count:
                return
            time.sleep(0.02)
        raise AssertionError(f"{self.closed} upstream connections closed, not {count}")

    def stop(self) -> None:
        self.stopping.set()
        self.listener.close()
        with self.lock:
            sockets = list(self._sockets)
        for sock in sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class _Lines:
    """Line and data reading on one upstream socket."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = b""

    def send(self, reply: str) -> None:
        self.sock.sendall(reply.encode() + b"\r\n")

    def line(self) -> str | None:
        while b"\r\n" not in self.buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                return None
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\r\n", 1)
        return line.decode("utf-8", "replace")

    def data(self, rate: float | None) -> bytes | None:
        """Up to the final dot, at most `rate` bytes a second when given."""
        data = bytearray(b"\r\n" + self.buffer)
        self.buffer = b""
        started, received = time.monotonic(), 0
        while True:
            end = data.find(b"\r\n.\r\n", max(0, len(data) - 65536 - 5))
            if end >= 0:
                self.buffer = bytes(data[end + 5:])
                return bytes(data[2:end + 2])
            chunk = self.sock.recv(16384 if rate else 65536)
            if not chunk:
                return None
            data += chunk
            received += len(chunk)
            if rate:
                ahead = received / rate - (time.monotonic() - started)
                if ahead > 0:
                    time.sleep(ahead)


@pytest.fixture
def raw_upstream():
    server = RawUpstream()
    yield server
    server.stop()


def steps(client, content: bytes | None = None) -> list[tuple[str, str]]:
    """MAIL, RCPT, DATA on a logged-in raw client, up to the first refusal:
    [(step, reply)]."""
    done = [("MAIL", client.command(f"MAIL FROM:<{SENDER}>"))]
    if done[-1][1][:1] != "2":
        return done
    done.append(("RCPT", client.command(f"RCPT TO:<{RECIPIENT}>")))
    if done[-1][1][:1] != "2":
        return done
    done.append(("DATA", client.command("DATA")))
    if not done[-1][1].startswith("354"):
        return done
    client.send(message() if content is None else content)
    done.append(("data", client.command(b".")))
    return done


def outcome_lines(relay, message_id: str) -> list[str]:
    return [line for line in relay.log().splitlines()
            if re.search(rf" (delivered|delivery-failed) id={message_id} ", line)]


def wait_until(predicate, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


# ---------------------------------------------------------------------------------------
# 1. No session goes back to the pool with a transaction open
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("refusal", ["554 5.7.1 Refused by data restrictions",
                                     "451 4.3.0 Try again later"])
def test_refused_data_command_does_not_poison_the_pool(start, raw_upstream, raw_client,
                                                       refusal):
    raw_upstream.data_command_replies = [refusal]
    relay = start(raw_upstream)
    first = raw_client(relay.port)
    first.login()
    # The relay reads the data before it goes upstream: the refusal comes after the dot.
    assert steps(first)[-1] == ("data", refusal)
    relay.wait_for_log("delivery-failed")
    first.close()
    # The next client, on the same relay: delivered, and the upstream saw no nested MAIL.
    for _ in range(3):
        client = raw_client(relay.port)
        client.login()
        assert steps(client)[-1][1].startswith("250 2.0.0 Ok: queued as RAW")
        client.close()
    assert raw_upstream.nested_mail == 0
    assert len(raw_upstream.messages) == 3
    # One upstream session carried it all: reset (RSET), not thrown away.
    assert raw_upstream.connections == 1
    assert "RSET" in raw_upstream.commands


def test_refused_data_command_then_same_client_sends_again(start, raw_upstream,
                                                           raw_client):
    raw_upstream.data_command_replies = ["554 5.7.1 Refused by data restrictions"]
    relay = start(raw_upstream)
    client = raw_client(relay.port)
    client.login()
    assert steps(client)[-1][1].startswith("554 ")
    assert steps(client)[-1][1].startswith("250 2.0.0 Ok: queued as RAW1")
    assert raw_upstream.nested_mail == 0


def test_mail_answered_with_another_2xx_opens_the_transaction(start, raw_upstream,
                                                              raw_client):
    raw_upstream.mail_replies = ["251 2.1.0 Sender ok, will forward"]
    relay = start(raw_upstream)
    with relay.client() as client:  # smtplib: MAIL must get 250 for it to go on
        assert client.sendmail(SENDER, [RECIPIENT], message()) == {}
    with relay.client() as client:
        assert client.sendmail(SENDER, [RECIPIENT], message()) == {}
    assert len(raw_upstream.messages) == 2
    assert raw_upstream.nested_mail == 0
    assert raw_upstream.connections == 1


def test_mail_answered_with_another_2xx_then_abandoned_is_reset(start, raw_upstream,
                                                                raw_client):
    raw_upstream.mail_replies = ["251 2.1.0 Sender ok, will forward"]
    relay = start(raw_upstream)
    client = raw_client(relay.port)
    client.login()
    assert client.command(f"MAIL FROM:<{SENDER}>").startswith("250 ")
    assert client.command("RSET").startswith("250")
    assert steps(client)[-1][1].startswith("250 2.0.0 Ok: queued as RAW1")
    client.close()
    client = raw_client(relay.port)
    client.login()
    assert client.command(f"MAIL FROM:<{SENDER}>").startswith("250 ")
    client.close()  # leaves mid-transaction
    client = raw_client(relay.port)
    client.login()
    assert steps(client)[-1][1].startswith("250 2.0.0 Ok: queued as RAW2")
    assert raw_upstream.nested_mail == 0


def test_data_command_answered_2xx_is_not_a_delivery(start, raw_upstream, raw_client):
    # A 2xx to the DATA command itself (no 354): nothing was sent, so no 250.
    raw_upstream.data_command_replies = ["250 2.0.0 Ok"]
    relay = start(raw_upstream)
    client = raw_client(relay.port)
    client.login()
    step, reply = steps(client)[-1]
    assert step == "data" and reply.startswith("451 4.4.2 "), reply
    relay.wait_for_log("delivery-failed")
    assert "delivered" not in relay.log()
    raw_upstream.wait_closed(1)  # that upstream session is thrown away
    assert steps(client)[-1][1].startswith("250 2.0.0 Ok: queued as RAW1")
    assert raw_upstream.nested_mail == 0


# ---------------------------------------------------------------------------------------
# 8. Uploads bounded by TIMEOUT without progress, not in total
# ---------------------------------------------------------------------------------------

def big_message(size: int) -> bytes:
    line = b"x" * 76 + b"\r\n"
    return message(body="") + line * (size // len(line))


@pytest.mark.parametrize(("rate", "size"), [(256 * 1024, 2 * 1024 * 1024),
                                            (64 * 1024, 512 * 1024)])
def test_slow_upstream_reader_gets_a_large_message(start, raw_upstream, raw_client,
                                                   rate, size):
    # About 8 s to read, with TIMEOUT=3. At 64 KB/s, what the kernels still hold after
    # the last send alone takes longer than TIMEOUT to drain: the wait for the reply
    # after the dot must not start before the upstream has taken the data.
    raw_upstream.read_rate = rate
    relay = start(raw_upstream, TIMEOUT=3)
    client = raw_client(relay.port, timeout=120)
    client.login()
    content = big_message(size)
    last = steps(client, content)[-1]
    assert last[0] == "data" and last[1].startswith("250 2.0.0 Ok: queued as RAW1"), last
    assert raw_upstream.messages[0].endswith(content)
    relay.wait_for_log("delivered")


def test_upstream_that_stops_reading_gets_451(start, raw_upstream, raw_client):
    raw_upstream.stop_reading = True
    relay = start(raw_upstream, TIMEOUT=3)
    client = raw_client(relay.port, timeout=60)
    client.login()
    started = time.monotonic()
    last = steps(client, big_message(2 * 1024 * 1024))[-1]
    waited = time.monotonic() - started
    assert last[0] == "data" and last[1].startswith("451 4.4.2 "), last
    assert "timed out" in last[1], last
    assert waited < 40, waited  # about TIMEOUT; only "it did not hang" is asserted
    relay.wait_for_log("delivery-failed")


def test_upstream_that_stops_reading_a_small_message_gets_451(start, raw_upstream,
                                                              raw_client):
    raw_upstream.stop_reading = True
    relay = start(raw_upstream, TIMEOUT=3)
    client = raw_client(relay.port, timeout=60)
    client.login()
    last = steps(client)[-1]
    assert last[0] == "data" and last[1].startswith("451 4.4.2 "), last
    relay.wait_for_log("delivery-failed")

def test_large_message_over_implicit_tls_is_delivered(start, make_upstream,
                                                      server_tls_context, server_cert):
    # The upload in pieces over an SSL socket, and the wait for it to be taken.
    upstream = make_upstream(implicit_tls_context=server_tls_context)
    relay = start(upstream, RELAY_USE_SSL="true", RELAY_HOST="localhost",
                  RELAY_TLS_CA_FILE=str(server_cert[2]), TIMEOUT=3)
    content = big_message(3 * 1024 * 1024)
    with relay.client(timeout=60) as client:
        assert client.sendmail(SENDER, [RECIPIENT], content) == {}
    assert upstream.messages[0].content.endswith(content)


# ---------------------------------------------------------------------------------------
# 9. Every message ends with exactly one outcome line, even when the client left
# ---------------------------------------------------------------------------------------

def metric(relay, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{relay.env['HTTP_PORT']}/metrics",
                                timeout=10) as response:
        text = response.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith((name + "{", name + " ")))


def leave_after_the_dot(relay, raw_client) -> None:
    client = raw_client(relay.port)
    client.login()
    assert client.command(f"MAIL FROM:<{SENDER}>").startswith("250")
    assert client.command(f"RCPT TO:<{RECIPIENT}>").startswith("250")
    assert client.command("DATA").startswith("354")
    client.send(message() + b".\r\n")
    client.close()


def received_id(content: bytes) -> str:
    found = re.search(rb"\(smtp-relay\) with \w+ id (\w+)", content)
    assert found, content[:300]
    return found.group(1).decode()


def test_client_leaving_while_upstream_accepts_is_logged_delivered(start, raw_upstream,
                                                                   raw_client):
    raw_upstream.final_stall = 2
    relay = start(raw_upstream, HTTP_PORT=free_port())
    leave_after_the_dot(relay, raw_client)
    wait_until(lambda: raw_upstream.messages, "the upstream to get the message")
    message_id = received_id(raw_upstream.messages[0])
    wait_until(lambda: outcome_lines(relay, message_id), "an outcome line")
    time.sleep(0.5)  # a second line, were there one, would be written by now
    lines = outcome_lines(relay, message_id)
    assert len(lines) == 1 and " delivered " in lines[0], lines
    assert metric(relay, "smtp_relay_messages_accepted_total") == 1
    # The pooled session was left clean: the next message goes through on it.
    raw_upstream.final_stall = 0
    with relay.client() as client:
        assert client.sendmail(SENDER, [RECIPIENT], message()) == {}
    assert raw_upstream.nested_mail == 0
    assert len(raw_upstream.messages) == 2


def test_client_leaving_while_upstream_refuses_is_logged_failed(start, raw_upstream,
                                                                raw_client):
    raw_upstream.final_stall = 2
    raw_upstream.final_replies = ["554 5.6.0 Content refused"]
    relay = start(raw_upstream)
    leave_after_the_dot(relay, raw_client)
    wait_until(lambda: "delivery-failed" in relay.log(), "delivery-failed")
    time.sleep(0.5)
    assert len(re.findall(r" (delivered|delivery-failed) ", relay.log())) == 1
    assert 'upstream="554 5.6.0 Content refused"' in relay.log()
    raw_upstream.final_stall = 0
    with relay.client() as client:
        assert client.sendmail(SENDER, [RECIPIENT], message()) == {}
    assert raw_upstream.nested_mail == 0


def test_client_leaving_then_shutdown_still_logs_the_outcome(start, raw_upstream,
                                                             raw_client):
    raw_upstream.final_stall = 2
    relay = start(raw_upstream)
    leave_after_the_dot(relay, raw_client)
    wait_until(lambda: "RCPT" in raw_upstream.commands and raw_upstream.commands[-1]
               == "DATA", "the upstream to get DATA")
    time.sleep(0.3)
    assert relay.stop() == 0
    log = relay.log()
    assert len(re.findall(r" INFO delivered ", log)) == 1, log
    assert log.index(" delivered ") < log.index(" stopped")


# ---------------------------------------------------------------------------------------
# 14. Reply codes outside 200-599 never reach the client
# ---------------------------------------------------------------------------------------

BAD_REPLIES = ["199 hi", "600 x", "garbage"]


@pytest.mark.parametrize("bad", BAD_REPLIES)
@pytest.mark.parametrize("stage", ["MAIL", "RCPT", "DATA", "data"])
def test_bad_upstream_reply_code_becomes_451(start, raw_upstream, raw_client, stage,
                                             bad):
    queue = {"MAIL": raw_upstream.mail_replies, "RCPT": raw_upstream.rcpt_replies,
             "DATA": raw_upstream.data_command_replies,
             "data": raw_upstream.final_replies}[stage]
    queue.append(bad)
    relay = start(raw_upstream)
    client = raw_client(relay.port)
    client.login()
    step, reply = steps(client)[-1]
    assert step == ("data" if stage == "DATA" else stage), (step, reply)
    assert reply.startswith("451 4.4.2 "), reply
    assert "\n" not in reply
    # That upstream session is thrown away, and the client's next message goes through.
    raw_upstream.wait_closed(1)
    assert client.command("RSET").startswith("250")
    assert steps(client)[-1][1].startswith("250 2.0.0 Ok: queued as RAW")
    assert raw_upstream.connections == 2
    assert raw_upstream.nested_mail == 0


def test_final_reply_3xx_is_not_passed_on(start, raw_upstream, raw_client):
    raw_upstream.final_replies = ["354 again?"]
    relay = start(raw_upstream)
    client = raw_client(relay.port)
    client.login()
    reply = steps(client)[-1][1]
    assert reply.startswith("451 4.4.2 "), reply
    raw_upstream.wait_closed(1)
    assert steps(client)[-1][1].startswith("250 2.0.0 Ok: queued as RAW1")
