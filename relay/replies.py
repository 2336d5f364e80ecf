"""Every reply the relay itself makes, named once: one per row of README's "What the
client is told" table.

A Reply carries what goes to the client (code, enhanced status, text with {fields})
and what the operator sees: the log event, its level, and the metric reason it is
counted under (`smtp_relay_messages_rejected_total{reason}` for transactions,
`smtp_relay_connections_refused_total{reason}` for connections). Replies that come
from the upstream are passed on as the upstream gave them and never pass through here,
except to be counted (see `upstream_reason`).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any


@dataclasses.dataclass(frozen=True)
class Reply:
    code: int  # the SMTP reply code
    status: str  # RFC 3463 enhanced status code, "" where aiosmtpd's style has none
    text: str  # str.format template: the fields come from the situation
    event: str  # the log line's event name
    reason: str = ""  # metric label; "" for replies that are not counted as refusals
    level: int = logging.WARNING  # of the log line
    counter: str = "messages_rejected"  # which Metrics counter `reason` labels

    def format(self, **fields: Any) -> str:
        """The reply line as the client gets it (without CRLF)."""
        text = self.text.format(**fields) if fields else self.text
        return f"{self.code} {self.status} {text}" if self.status else f"{self.code} {text}"


def upstream_reason(reply: str) -> str:
    """Metric label for a refusal that came from the upstream."""
    return "upstream_4xx" if reply[:1] == "4" else "upstream_5xx"


# --- connections -------------------------------------------------------------------------
TOO_MANY_CONNECTIONS = Reply(421, "4.7.0", "Too many connections, try again later",
                             "connection-refused", "max_connections", counter="connections_refused")
TOO_MANY_FROM_ADDRESS = Reply(421, "4.7.0", "Too many connections from your address, "
                              "try again later", "connection-refused",
                              "max_connections_per_ip", counter="connections_refused")
CLIENT_NOT_ALLOWED = Reply(554, "5.7.1", "Your address is not allowed to use this relay",
                           "connection-refused", "network", counter="connections_refused")
LOCKED_OUT = Reply(421, "4.7.0", "Too many failed logins from your address; try again "
                   "later", "connection-refused", "locked_out", counter="connections_refused")
IDLE_TIMEOUT = Reply(421, "4.4.2", "Idle timeout, closing connection", "idle-timeout",
                     level=logging.INFO)
LOGIN_TIMEOUT = Reply(421, "4.7.0", "No AUTH within {seconds:g} s of connecting, closing "
                      "connection", "auth-timeout", level=logging.INFO)
TOO_MANY_ERRORS = Reply(421, "4.7.0", "Too many errors, closing connection",
                        "too-many-errors")
TLS_FAILED = Reply(421, "4.7.0", "TLS handshake failed", "tls-failed")
SHUTTING_DOWN = Reply(421, "4.3.2", "Service shutting down", "shutdown",
                      level=logging.INFO)
INTERNAL_ERROR = Reply(451, "4.3.0", "Internal error: try again later", "internal-error",
                       level=logging.ERROR)
# RATE_LIMIT_FAILURE=closed and RATE_LIMIT_STORAGE unreachable: limits or lock-outs
# cannot be checked (StorageOutage logs the outage once; each refusal at DEBUG).
LIMITS_UNAVAILABLE = Reply(451, "4.3.0", "Limits cannot be checked now, try again later",
                           "limits-unavailable", "rate_limit_storage", level=logging.DEBUG)

# --- AUTH --------------------------------------------------------------------------------
AUTH_OK = Reply(235, "2.7.0", "Authentication successful", "auth-ok", level=logging.INFO)
AUTH_FAILED = Reply(535, "5.7.8", "Authentication credentials invalid", "auth-failed")
AUTH_IN_TRANSACTION = Reply(503, "5.5.1", "AUTH not permitted during a mail transaction",
                            "auth-refused")
CRAM_MD5_INITIAL = Reply(501, "5.5.4", "CRAM-MD5 takes no initial response",
                         "auth-refused")

# --- MAIL, RCPT: addresses (policy.AddressError carries one of these) -------------------
MALFORMED_ADDRESS = Reply(553, "5.1.3", "{detail}", "address-refused", "address")
AMBIGUOUS_ROUTING = Reply(553, "5.7.1", "{detail}", "address-refused", "address")
NEEDS_SMTPUTF8 = Reply(553, "5.6.7", "{detail}", "address-refused", "address")

# --- MAIL --------------------------------------------------------------------------------
AUTH_REQUIRED = Reply(530, "5.7.0", "Authentication required", "rejected", "auth")
SENDER_DOMAIN = Reply(553, "5.7.1", "Sender domain {domain} is not allowed",
                      "sender-refused", "sender_domain")
RATE_LIMITED = Reply(451, "4.7.1", "Rate limit reached ({limit}): try again in "
                     "{seconds} s", "rate-limited", "rate")
NO_SMTPUTF8 = Reply(555, "5.6.7", "The upstream does not support SMTPUTF8: send this "
                    "message with ASCII addresses", "sender-refused", "upstream_5xx")

# --- RCPT --------------------------------------------------------------------------------
# RCPT pipelined after a MAIL that went upstream with it and was refused there: what
# the upstream itself says to a RCPT without a sender (the MAIL's refusal is logged).
NO_SENDER = Reply(503, "5.5.1", "Error: need MAIL command", "recipient-refused",
                  level=logging.DEBUG)
RECIPIENT_DOMAIN = Reply(550, "5.7.1", "Recipient domain {domain} is not allowed",
                         "recipient-refused", "recipient_domain")
TOO_MANY_RECIPIENTS = Reply(452, "4.5.3", "Too many recipients (at most {limit})",
                            "recipient-refused", "too_many_recipients")

# --- the upstream, when it cannot answer for itself -------------------------------------
UPSTREAM_UNAVAILABLE = Reply(451, "4.4.1", "Upstream unavailable: {detail}",
                             "upstream-failed", "upstream_4xx", logging.ERROR)
UPSTREAM_CREDENTIALS = Reply(451, "4.7.0", "Upstream unavailable: {detail}",
                             "upstream-failed", "upstream_4xx", logging.ERROR)
UPSTREAM_DROPPED = Reply(451, "4.4.2", "Upstream unavailable: {detail}",
                         "upstream-failed", "upstream_4xx", logging.ERROR)
UPSTREAM_LOST = Reply(451, "4.4.2", "Upstream connection was lost: {detail}",
                      "upstream-failed", "upstream_4xx", logging.ERROR)
UPSTREAM_FAILED_DATA = Reply(451, "4.4.2", "Upstream failed during DATA: {detail}",
                             "delivery-failed", "upstream_4xx", logging.ERROR)
UPSTREAM_TRANSACTION_LOST = Reply(451, "4.4.2", "Upstream transaction was lost: {detail}",
                                  "upstream-failed", "upstream_4xx", logging.ERROR)

# --- DATA --------------------------------------------------------------------------------
SMUGGLING = Reply(550, "5.6.0", "Message refused: {problem}", "message-refused",
                  "content")
TOO_MUCH_DATA = Reply(552, "", "Error: Too much mail data", "message-refused", "content")
LINE_TOO_LONG = Reply(500, "", "Line too long (see RFC5321 4.5.3.1.6)", "message-refused",
                      "content")
HEADERS_TOO_LARGE = Reply(552, "5.3.4", "Message refused: header section too large (at "
                          "most {limit} MiB)", "message-refused", "content")
MAIL_LOOP = Reply(554, "5.4.6", "Too many hops ({hops} Received: headers, at most "
                  "{limit}): mail loop?", "message-refused", "content")
HEADER_FROM = Reply(550, "5.7.1", "From: header refused: {detail}", "message-refused",
                    "content")
HEADER_FROM_MISSING = Reply(550, "5.7.1", "{detail}", "message-refused", "content")
HEADER_FROM_DOMAIN = Reply(550, "5.7.1", "From: header domain {domain} is not allowed",
                           "message-refused", "content")
NO_8BITMIME = Reply(554, "5.6.3", "The upstream does not support 8BITMIME and the "
                    "message has 8-bit content", "message-refused", "content")

# --- the queue (DELIVERY_MODE queue or fallback) ------------------------------------------
SENDER_OK = Reply(250, "2.1.0", "Sender OK", "sender-accepted", level=logging.DEBUG)
RECIPIENT_OK = Reply(250, "2.1.5", "Recipient OK", "recipient-accepted", level=logging.DEBUG)
QUEUED = Reply(250, "2.0.0", "Queued as {id}", "queued", level=logging.INFO)
QUEUED_PARTLY = Reply(250, "", "{upstream}; queued as {id} for {count} recipient(s)",
                      "queued", level=logging.INFO)
QUEUE_FULL = Reply(452, "4.3.1", "Queue full, try again later", "queue-full", "queue_full")
QUEUE_FAILED = Reply(451, "4.3.0", "Cannot store the message now, try again later",
                     "queue-failed", "queue_error", logging.ERROR)

# --- other commands ----------------------------------------------------------------------
OK = Reply(250, "2.0.0", "OK", "ok", level=logging.DEBUG)
ALREADY_TLS = Reply(503, "5.5.1", "Already running TLS", "starttls-refused")
SIZE_SYNTAX = Reply(501, "5.5.4", "Syntax: SIZE=<size in bytes, digits>", "sender-refused")
AUTH_LINE_TOO_LONG = Reply(500, "5.5.6", "Authentication exchange line is too long",
                           "auth-refused")
