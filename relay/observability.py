"""What the relay tells its operator: log lines and Prometheus metrics.

One line per event (`event key=value ...`, or one JSON object), the same keys for the
same things on every line (id, peer, user, from, to) so one grep follows a message from
MAIL to the upstream's verdict. `Metrics` holds every counter; `record_outcome` is the
one call that writes an outcome's log line and counts it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import sys
import threading
import time
from typing import TYPE_CHECKING, Any

import prometheus_client

from relay.policy import one_line
from relay.replies import Reply, upstream_reason
from relay.settings import ConfigError

if TYPE_CHECKING:
    from relay.protocol import RelaySession
    from relay.settings import Config


log = logging.getLogger("smtp_relay")


_NEEDS_QUOTES = re.compile(r'[\s"=]')


def log_field(value: object) -> str:
    if isinstance(value, (list, tuple)):
        value = ",".join(map(str, value))
    text = one_line(value)
    if not text or _NEEDS_QUOTES.search(text):
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return text


def log_event(level: int, event: str, session: RelaySession | None = None, **fields: Any) -> None:
    if not log.isEnabledFor(level):
        return
    if session is not None:
        fields = {"id": getattr(session, "message_id", None),
                  "peer": getattr(session, "peer_ip", None),
                  "user": session_user(session), **fields}
    log.log(level, event, extra={"event": event, "fields": fields})


def session_user(session: RelaySession) -> str | None:
    user = getattr(session, "user", None)
    if user is None and getattr(session, "trusted", False):
        return f"trusted:{session.peer_ip}"
    return user


class TextFormatter(logging.Formatter):
    """`2026-11-21 23:20:44,445 INFO event key=value ...`, the date part built once a
    second (strftime on every line is a measurable share of the relay's CPU)."""

    _second, _date = -1, ""

    def timestamp(self, record: logging.LogRecord) -> str:
        second = int(record.created)
        if second != self._second:
            self._second = second
            self._date = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(second))
        return f"{self._date},{int(record.msecs):03d}"

    def format(self, record: logging.LogRecord) -> str:
        fields = getattr(record, "fields", None)
        if fields is None:  # a plain log.warning(...): start-up notes, library lines
            text = one_line(record.getMessage())
        else:
            text = " ".join([getattr(record, "event", "")] + [f"{key}={log_field(value)}"
                                              for key, value in fields.items()
                                              if value is not None])
        line = f"{self.timestamp(record)} {record.levelname} {text}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JSONFormatter(TextFormatter):
    """One JSON object per line. The keys in JSON_KEYS are always present (null when
    they do not apply), so a log pipeline can rely on them; other fields follow."""

    JSON_KEYS = ("time", "level", "event", "id", "peer", "user", "from", "to", "size",
                 "upstream", "duration_ms")

    def format(self, record: logging.LogRecord) -> str:
        fields = dict(getattr(record, "fields", None) or {})
        entry: dict[str, Any] = dict.fromkeys(self.JSON_KEYS)
        entry.update(time=self.timestamp(record), level=record.levelname,
                     event=getattr(record, "event", "message"))
        if not hasattr(record, "fields"):
            entry["message"] = record.getMessage()
        for key, value in fields.items():
            entry[key] = value if isinstance(value, (int, float, type(None))) else (
                list(value) if isinstance(value, (list, tuple)) else str(value))
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return _JSON_UNSAFE.sub(_json_safe, json.dumps(entry, ensure_ascii=False))


# What json.dumps(ensure_ascii=False) leaves raw inside strings that a log line cannot
# carry: lone surrogates (a client's invalid UTF-8 bytes, which aiosmtpd decodes with
# surrogateescape, cannot be written as UTF-8 at all), and characters that some
# readers take for line breaks (U+0085, U+2028, U+2029; JavaScript, str.splitlines).
_JSON_UNSAFE = re.compile(r"[\ud800-\udfff\u0085\u2028\u2029]")


def _json_safe(match: re.Match[str]) -> str:
    char = ord(match.group())
    if 0xDC80 <= char <= 0xDCFF:  # the byte the client sent, shown as text: \xff
        return f"\\\\x{char - 0xDC00:02x}"
    if 0xD800 <= char <= 0xDFFF:
        return "\\ufffd"
    return f"\\u{char:04x}"


class LogHandler(logging.Handler):
    """Writes each line, formatted once, to stderr and to LOG_FILE.

    The file rotates at LOG_MAX_BYTES (LOG_BACKUP_COUNT old files: .1 newest), and
    reopen() (on SIGHUP) starts a new file after an external logrotate moved it.

    Lines logged on the event loop are written together at the end of the loop's
    current turn (one write and flush per stream, not one per line: each write gives
    up the GIL to the upstream threads); lines from other threads, or with no loop
    attached, are written at once, after any still pending, so the order holds.
    """

    def __init__(self, path: str, max_bytes: int, backup_count: int):
        super().__init__()
        self.path, self.max_bytes, self.backup_count = path, max_bytes, backup_count
        self.file: Any = None
        self.size = 0
        self._pending: list[str] = []  # formatted lines not yet written
        self._loop: asyncio.AbstractEventLoop | None = None  # see attach
        self._loop_thread = 0
        if path:
            self.reopen()

    def attach(self, loop: asyncio.AbstractEventLoop | None) -> None:
        """Batch the lines logged on `loop` (None: write every line at once again)."""
        self.flush()
        self._loop, self._loop_thread = loop, threading.get_ident()

    def reopen(self) -> None:
        """Open the file anew (first, so a failure keeps the old one in use)."""
        new = open(self.path, "a", encoding="utf-8",  # noqa: SIM115
                   errors="backslashreplace")  # never a line lost to an odd character
        assert self.lock is not None  # Handler.__init__ made it
        with self.lock:
            old, self.file, self.size = self.file, new, new.tell()
        if old is not None:
            old.close()

    def _rotate(self) -> None:
        self.file.close()
        for number in range(self.backup_count - 1, 0, -1):
            older = f"{self.path}.{number}"
            if os.path.exists(older):
                os.replace(older, f"{self.path}.{number + 1}")
        if self.backup_count > 0:
            os.replace(self.path, f"{self.path}.1")
        self.file = open(self.path, "w", encoding="utf-8",  # noqa: SIM115
                         errors="backslashreplace")
        self.size = 0

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record) + "\n"
        except Exception:  # noqa: BLE001 (a logging failure must never break a delivery)
            self.handleError(record)
            return
        self._queue([line])

    def write_lines(self, lines: list[str]) -> None:
        """Lines formatted elsewhere (the delivery process), written as if logged here."""
        self._queue(lines)

    def _queue(self, lines: list[str]) -> None:
        assert self.lock is not None  # Handler.__init__ made it
        with self.lock:
            batch = bool(self._pending)
            self._pending.extend(lines)
        loop = self._loop
        if loop is not None and threading.get_ident() == self._loop_thread and \
                not loop.is_closed():
            if not batch:  # the first line of this turn: write them all at its end
                loop.call_soon(self.flush)
            return
        self.flush()

    def flush(self) -> None:
        """Write what is pending: one write and one flush per stream."""
        assert self.lock is not None
        with self.lock:
            lines, self._pending = self._pending, []
            if not lines:
                return
            text = "".join(lines)
            try:
                sys.stderr.write(text)
                sys.stderr.flush()
                if self.file is not None:
                    self._write_file(lines)
            except Exception:  # noqa: BLE001 (never break a delivery)
                self.handleError(logging.makeLogRecord({"msg": text.rstrip("\n")}))

    def _write_file(self, lines: list[str]) -> None:
        chunk: list[str] = []
        for line in lines:
            length = len(line) if line.isascii() else len(
                line.encode("utf-8", "backslashreplace"))
            if self.max_bytes and self.size and self.size + length > self.max_bytes:
                if chunk:
                    self.file.write("".join(chunk))
                    chunk = []
                self._rotate()
            chunk.append(line)
            self.size += length
        self.file.write("".join(chunk))
        self.file.flush()

    def close(self) -> None:
        self.flush()
        super().close()


def write_formatted_lines(lines: list[str]) -> None:
    """Log lines formatted by the delivery process, through our LogHandler (stderr if
    there is none: a relay run in-process without setup_logging)."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, LogHandler):
            handler.write_lines(lines)
            return
    sys.stderr.write("".join(lines))


def install_root_handler(handler: logging.Handler, config: Config) -> None:
    """`handler` as the only one for every line, in LOG_FORMAT, at LOG_LEVEL (the
    relay's LogHandler, or the delivery process's shipping handler)."""
    handler.setFormatter(JSONFormatter() if config.log_format == "json"
                         else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(config.log_level)
    # Fields our lines never show; the logging docs' own advice for less overhead
    # (_srcfile = None skips walking the stack for the caller on every line).
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    logging._srcfile = None


def setup_logging(config: Config) -> LogHandler:
    """stderr and LOG_FILE, one line per event; aiosmtpd's chatter only at DEBUG."""
    try:
        directory = os.path.dirname(config.log_file)
        if directory:
            os.makedirs(directory, exist_ok=True)
        handler = LogHandler(config.log_file, config.log_max_bytes,
                              config.log_backup_count)
    except OSError as error:
        raise ConfigError(f"LOG_FILE={config.log_file!r}: cannot open "
                          f"({error.strerror}): expects a writable file path") from None
    install_root_handler(handler, config)
    # aiosmtpd logs every command line at INFO on "mail.log": noise, and slow.
    library = logging.getLogger("mail.log")
    library.setLevel(logging.DEBUG if config.log_level == "DEBUG" else logging.WARNING)
    # Its PROXY parser warns on "mail.debug" about each bad header; the relay writes
    # its own line (proxy-header-invalid) instead.
    logging.getLogger("mail.debug").setLevel(
        logging.DEBUG if config.log_level == "DEBUG" else logging.ERROR)
    if not any(isinstance(f, HideAuthData) for f in library.filters):
        library.addFilter(HideAuthData())
    return handler


# What aiosmtpd may name in its lines (the first word of a command line).
_SMTP_VERBS = frozenset({
    "HELO", "EHLO", "LHLO", "MAIL", "RCPT", "DATA", "BDAT", "RSET", "VRFY", "EXPN",
    "HELP", "NOOP", "QUIT", "STARTTLS", "AUTH", "TURN", "ETRN", "ATRN", "SEND", "SOML",
    "SAML", "XCLIENT", "XFORWARD", "PROXY"})


_SASL_MECHANISMS = frozenset({
    "PLAIN", "LOGIN", "CRAM-MD5", "DIGEST-MD5", "XOAUTH2", "OAUTHBEARER", "GSSAPI",
    "NTLM", "ANONYMOUS", "EXTERNAL", "SCRAM-SHA-1", "SCRAM-SHA-256"})


_HIDDEN = "********"


def hide_auth_data(line: bytes | str) -> bytes | str:
    """A client's line as it may be logged: after `AUTH <mechanism>` nothing shown, and
    nothing of a line that is not an SMTP command at all (a base64 password sent after
    the AUTH was refused, a raw password answering a prompt...)."""
    text = line.decode("ascii", "replace") if isinstance(line, bytes) else line
    words = text.split(None, 2)
    verb = words[0].upper() if words else ""
    if verb == "AUTH":
        keep = "AUTH " + words[1] if len(words) > 1 and \
            words[1].upper() in _SASL_MECHANISMS else "AUTH"
        shown = keep if keep.count(" ") + 1 == len(words) else f"{keep} {_HIDDEN}"
    elif verb in _SMTP_VERBS or not words:
        return line
    else:
        shown = f"{_HIDDEN} (not an SMTP command: not shown)"
    return shown.encode() if isinstance(line, bytes) else shown


class HideAuthData(logging.Filter):
    """On aiosmtpd's "mail.log" (shown at LOG_LEVEL=DEBUG, warnings always): no AUTH
    data. aiosmtpd masks only `AUTH <mechanism> <response>` in upper case; a client's
    password also reaches its lines in lower-case commands, as the text of a
    "can't decode base64" line, and as "commands" sent after a refused AUTH."""

    # aiosmtpd's formats whose arguments are what the client sent.
    CLIENT_LINES = ("_handle_client readline: %r", "%r >> %r", "%r unrecognised: %s")

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if not isinstance(args, tuple):
            return True
        if record.msg == "%r can't decode base64: %s":
            record.args = (*args[:1], _HIDDEN)
        elif record.msg in self.CLIENT_LINES:
            record.args = tuple(hide_auth_data(a) if isinstance(a, (bytes, str)) else a
                                for a in args)
        else:  # any other line of theirs: at least no AUTH response
            record.args = tuple(hide_auth_data(a) if isinstance(a, (bytes, str)) and
                                a[:4].upper() in ("AUTH", b"AUTH") else a for a in args)
        return True


class Metrics:
    """Prometheus metrics, served on /metrics when HTTP_PORT is set. Every metric about
    a message carries the user (for trusted-network clients: trusted:<address>)."""

    def __init__(self) -> None:
        self.registry = prometheus_client.CollectorRegistry()
        registry = self.registry
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}  # see labelled
        self.connections_open = prometheus_client.Gauge(
            "smtp_relay_connections_open", "Client connections open now.",
            registry=registry)
        self.connections = prometheus_client.Counter(
            "smtp_relay_connections", "Client connections accepted.", registry=registry)
        self.connections_refused = prometheus_client.Counter(
            "smtp_relay_connections_refused",
            "Client connections refused at the greeting.", ["reason"],
            registry=registry)
        self.auth = prometheus_client.Counter(
            "smtp_relay_auth", "AUTH attempts.", ["result"], registry=registry)
        self.messages_accepted = prometheus_client.Counter(
            "smtp_relay_messages_accepted",
            "Messages the upstream accepted (the client got 250).", ["user"],
            registry=registry)
        self.messages_rejected = prometheus_client.Counter(
            "smtp_relay_messages_rejected",
            "Refused MAIL, RCPT or DATA, by reason.", ["reason", "user"],
            registry=registry)
        self.recipients = prometheus_client.Counter(
            "smtp_relay_recipients", "Recipients of accepted messages.", ["user"],
            registry=registry)
        self.bytes = prometheus_client.Counter(
            "smtp_relay_bytes", "Bytes of accepted messages.", ["user"],
            registry=registry)
        self.upstream_duration = prometheus_client.Histogram(
            "smtp_relay_upstream_delivery_seconds",
            "From sending DATA upstream to the upstream's final reply.",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
            registry=registry)
        self.upstream_sessions_open = prometheus_client.Gauge(
            "smtp_relay_upstream_sessions_open", "Upstream sessions open (pooled or "
            "in use).", registry=registry)
        self.upstream_sessions_opened = prometheus_client.Counter(
            "smtp_relay_upstream_sessions_opened", "Upstream sessions opened.",
            registry=registry)
        self.upstream_sessions_reused = prometheus_client.Counter(
            "smtp_relay_upstream_sessions_reused",
            "Transactions that reused a pooled upstream session.", registry=registry)

        # The queue (DELIVERY_MODE queue or fallback).
        self.queue_committed = prometheus_client.Counter(
            "smtp_relay_queue_committed", "Messages committed to the queue (bounces "
            "included).", registry=registry)
        self.queue_attempts = prometheus_client.Counter(
            "smtp_relay_queue_attempts", "Queued recipients' delivery attempts, by "
            "result: delivered, deferred, failed, expired.", ["result"], registry=registry)
        self.queue_bounces = prometheus_client.Counter(
            "smtp_relay_queue_bounces", "Bounces (DSNs) queued.", registry=registry)
        self.queue_recipients = prometheus_client.Gauge(
            "smtp_relay_queue_recipients", "Recipients in the store, by status.",
            ["status"], registry=registry)
        self.queue_oldest_age = prometheus_client.Gauge(
            "smtp_relay_queue_oldest_age_seconds", "Age of the oldest message still to "
            "be delivered; 0 when there is none.", registry=registry)
        self.upstream_up = prometheus_client.Gauge(
            "smtp_relay_upstream_up", "1 when the last upstream probe or queued delivery "
            "reached the upstream, 0 when it did not.", registry=registry)
        self.upstream_host_up = prometheus_client.Gauge(
            "smtp_relay_upstream_host_up", "Per upstream host (RELAY_HOST's list and the "
            "routes' smart hosts): 1 when its last handshake succeeded, 0 when it failed.",
            ["host"], registry=registry)
        self.mx_attempts = prometheus_client.Counter(
            "smtp_relay_mx_attempts", "MX deliveries of one recipient domain, by outcome "
            "(delivered, deferred, failed) and TLS (verified, unverified, none).",
            ["result", "tls"], registry=registry)
        # Per replica, like every metric here: Prometheus sums the replicas.
        self.rate_limit_storage_errors = prometheus_client.Counter(
            "smtp_relay_rate_limit_storage_errors",
            "Checks of rate limits or lock-outs that could not reach "
            "RATE_LIMIT_STORAGE.", registry=registry)
        self.draining = prometheus_client.Gauge(
            "smtp_relay_draining", "1 from SIGTERM on: /readyz answers 503 and the "
            "listeners accept no new connection.", registry=registry)

    def queue_observe(self, stats: dict[str, Any]) -> None:
        """The depth gauges, from Store.stats."""
        for status, count in stats["recipients"].items():
            self.queue_recipients.labels(status).set(count)
        self.queue_oldest_age.set(stats["oldest_queued_age"] or 0)

    def delivered(self, session: RelaySession, recipients: int, size: int) -> None:
        user = session_user(session) or "-"
        self.labelled(self.messages_accepted, user).inc()
        self.labelled(self.recipients, user).inc(recipients)
        self.labelled(self.bytes, user).inc(size)

    def rejected(self, reason: str, session: RelaySession | None) -> None:
        user = session_user(session) if session is not None else None
        self.labelled(self.messages_rejected, reason, user or "-").inc()

    def labelled(self, metric: Any, *labels: str) -> Any:
        """metric.labels(*labels), remembered: a child is made once per label values
        and never removed, so the same one can be handed out again (labels() takes a
        lock and checks its values on every call)."""
        key = (id(metric), labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def record(self, reply: Reply, session: RelaySession | None = None, *,
               event: str = "", **fields: Any) -> str:
        """The one place a reply the relay makes itself is written down: its log line
        (the reply's event, or `event` for a reply used at several stages, its level,
        the session's fields, `fields`, the reply text) and its count under the
        reply's metric reason. Returns the reply line for the client; `fields` also
        fill its template."""
        text = reply.format(**fields)
        if reply.reason:
            if reply.counter == "connections_refused":
                self.labelled(self.connections_refused, reply.reason).inc()
            else:
                self.rejected(reply.reason, session)
        log_event(reply.level, event or reply.event, session, **fields, reply=text)
        return text

    def record_upstream_refusal(self, event: str, reply: str, session: RelaySession,
                                **fields: Any) -> None:
        """A refusal that came from the upstream: passed on as it is, counted as
        upstream_4xx or upstream_5xx."""
        self.rejected(upstream_reason(reply), session)
        log_event(logging.WARNING, event, session, **fields, reason="upstream",
                  reply=reply)

