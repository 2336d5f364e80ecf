"""The queue's operator side: `python smtp_relay.py queue ...` (queue_command) and the JSON
API under /api/v1/ on HTTP_PORT (QueueAPI, served by relay.operations.HTTPEndpoint).

Both show a message the same way (message_json: times as ISO 8601 UTC plus unix seconds,
a summary status, the recipients, and in the single-message view every attempt) and
change it through the same Store calls (retry, hold, release, delete). The API is off
unless a token is configured; tokens are compared in constant time and never logged.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import hmac
import json
import logging
import math
import re
import sys
import time
import urllib.parse
from collections.abc import Callable
from typing import Any, TextIO

from relay.observability import log_event
from relay.policy import one_line
from relay.store import STATUSES, MessageRecord, RecipientState, Store, StoreError

# A queue id as the relay makes them is 16 lowercase hex characters; anything outside
# this shape is answered "unknown" before the store is asked (no odd input reaches SQL,
# a path or a log line).
MESSAGE_ID = re.compile(r"[0-9a-zA-Z-]{1,64}")

# The message's summary status is its least advanced recipient's: one recipient still
# held, deferred or waiting decides what the operator needs to know about the message.
SUMMARY_ORDER = ("held", "deferred", "queued", "delivering", "failed", "delivered")

LIST_LIMIT_DEFAULT = 100
LIST_LIMIT_MAX = 1000
JSON_TYPE = "application/json; charset=utf-8"

Response = tuple[int, dict[str, str], bytes]


# ---------------------------------------------------------------------------------------
# What a message looks like to the operator (CLI --json and the API: the same fields)
# ---------------------------------------------------------------------------------------

def iso_time(timestamp: float | None) -> str | None:
    """Unix seconds as ISO 8601 UTC with milliseconds and a Z: 2024-05-01T12:00:00.123Z."""
    if timestamp is None:
        return None
    moment = datetime.datetime.fromtimestamp(timestamp, datetime.UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_time(text: str) -> float:
    """Unix seconds, or ISO 8601 (a time without a zone is UTC). ValueError if neither."""
    try:
        seconds = float(text)
    except ValueError:
        moment = datetime.datetime.fromisoformat(text.strip())
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=datetime.UTC)
        seconds = moment.timestamp()
    if not math.isfinite(seconds):  # float() takes "nan" and "inf": no time at all
        raise ValueError(f"not a time: {text!r}")
    return seconds


def summary_status(record: MessageRecord) -> str:
    statuses = {recipient.status for recipient in record.recipients}
    for status in SUMMARY_ORDER:
        if status in statuses:
            return status
    return "unknown"  # no recipients (or a status newer than this code): say so


def _next_attempt(recipient: RecipientState) -> float | None:
    # A held recipient keeps its old due time in the store (for nothing: release makes
    # it due now); no attempt is coming, so none is shown.
    return None if recipient.status == "held" else recipient.next_attempt


def message_json(record: MessageRecord, *, with_attempts: bool = False) -> dict[str, Any]:
    message: dict[str, Any] = {
        "id": record.id,
        "received": iso_time(record.received),
        "received_ts": record.received,
        "user": record.user,
        "peer": record.peer,
        "sender": record.sender,
        "size": record.size,
        "trace_id": record.trace_id,
        "has_body": record.has_body,
        "status": summary_status(record),
        "recipients": [{
            "address": recipient.address,
            "status": recipient.status,
            "attempts": recipient.attempts,
            "next_attempt": iso_time(_next_attempt(recipient)),
            "next_attempt_ts": _next_attempt(recipient),
            "last_reply": recipient.last_reply,
            "updated": iso_time(recipient.updated),
            "updated_ts": recipient.updated,
        } for recipient in record.recipients],
    }
    if with_attempts:
        message["attempts"] = [{
            "time": iso_time(attempt.time),
            "time_ts": attempt.time,
            "recipient": attempt.recipient,
            "upstream": attempt.upstream,
            "reply": attempt.reply,
            "duration": attempt.duration,
            "tls": attempt.tls,
        } for attempt in record.attempts]
    return message


def null_sender(address: str) -> str:
    """A sender filter: "<>" is the null sender, stored as ""."""
    return "" if address.strip() == "<>" else address


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


# ---------------------------------------------------------------------------------------
# The CLI: python smtp_relay.py queue ...
# ---------------------------------------------------------------------------------------

def _positive_limit(text: str) -> int:
    try:
        limit = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if limit < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return limit


def _time_argument(text: str) -> float:
    try:
        return parse_time(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not unix seconds or an ISO 8601 time: {text!r}") from None


def _queue_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="smtp_relay.py queue",
        description="Look at and act on the relay's queue (QUEUE_URL).")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    listing = commands.add_parser("list", help="messages, newest first")
    listing.add_argument("--status", choices=STATUSES,
                         help="messages with a recipient in this status")
    listing.add_argument("--rcpt", metavar="ADDRESS", help="messages to this recipient")
    listing.add_argument("--from", dest="sender", metavar="ADDRESS",
                         type=null_sender,
                         help="messages from this envelope sender ('<>' for none)")
    listing.add_argument("--user", help="messages from this authenticated user")
    listing.add_argument("--since", type=_time_argument, metavar="TIME",
                         help="received at or after (unix seconds or ISO 8601, UTC)")
    listing.add_argument("--until", type=_time_argument, metavar="TIME",
                         help="received before (unix seconds or ISO 8601, UTC)")
    listing.add_argument("--limit", type=_positive_limit, default=LIST_LIMIT_DEFAULT,
                         metavar="N", help=f"at most N messages ({LIST_LIMIT_DEFAULT})")
    listing.add_argument("--json", action="store_true",
                         help="one JSON object per line (the API's fields)")

    show = commands.add_parser("show", help="one message: recipients and attempts")
    show.add_argument("id")
    show.add_argument("--json", action="store_true", help="the API's JSON object")

    retry = commands.add_parser("retry", help="queued/deferred recipients due now")
    target = retry.add_mutually_exclusive_group(required=True)
    target.add_argument("id", nargs="?")
    target.add_argument("--all", action="store_true", help="of every message")

    for name, text in (("hold", "keep the message's recipients from delivery"),
                       ("release", "held recipients due now"),
                       ("delete", "remove the message and its record")):
        commands.add_parser(name, help=text).add_argument("id")
    return parser


def queue_command(argv: list[str], store: Store, out: TextIO) -> int:
    """`python smtp_relay.py queue list [--status S] [--rcpt A] [--from A] [--user U]
    [--limit N] [--json] | show ID | retry ID|--all | hold ID | release ID | delete ID`.
    Human-readable table by default; exit 0, 1 when the id is unknown (or the store
    fails), 2 on usage errors. Results go to `out`, complaints to stderr."""
    parser = _queue_parser()
    try:
        # argparse prints --help to stdout and exits; both belong to our caller's `out`
        # and return code, never a traceback.
        with contextlib.redirect_stdout(out):
            args = parser.parse_args(argv)
    except SystemExit as leaving:
        return leaving.code if isinstance(leaving.code, int) else 2
    try:
        if args.command == "list":
            return _list(args, store, out)
        if args.command == "retry" and args.all:
            count = store.retry(None)
            out.write(f"{plural(count, 'recipient')} due now\n")
            return 0
        if not MESSAGE_ID.fullmatch(args.id):
            return _unknown(args.id)
        if args.command == "show":
            return _show(args.id, args.json, store, out)
        return _act(args.command, args.id, store, out)
    except StoreError as error:
        print(f"smtp-relay: queue: {error}", file=sys.stderr)
        return 1


def _unknown(message_id: str) -> int:
    print(f"smtp-relay: queue: no message {one_line(message_id)!r}", file=sys.stderr)
    return 1


def _list(args: argparse.Namespace, store: Store, out: TextIO) -> int:
    records: list[MessageRecord] = []
    cursor: str | None = None
    while len(records) < args.limit:
        page, cursor = store.list(
            status=args.status, rcpt=args.rcpt, sender=args.sender, user=args.user,
            since=args.since, until=args.until, cursor=cursor,
            limit=min(args.limit - len(records), LIST_LIMIT_MAX))
        records.extend(page)
        if cursor is None or not page:
            break
    if args.json:
        out.writelines(json.dumps(message_json(record)) + "\n" for record in records)
        return 0
    if not records:
        out.write("no messages\n")
        return 0
    rows = [("ID", "RECEIVED (UTC)", "STATUS", "SENDER", "RECIPIENTS", "LAST REPLY")]
    rows += [_list_row(record) for record in records]
    widths = [max(len(row[column]) for row in rows) for column in range(5)]
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row, widths)] + [row[5]]
        out.write("  ".join(cells).rstrip() + "\n")
    if cursor is not None:
        out.write(f"(the first {len(records)}; more match: raise --limit)\n")
    return 0


def _list_row(record: MessageRecord) -> tuple[str, str, str, str, str, str]:
    received = datetime.datetime.fromtimestamp(record.received, datetime.UTC)
    addresses = [one_line(recipient.address) for recipient in record.recipients]
    recipients = addresses[0] if addresses else "-"
    if len(addresses) > 1:
        recipients += f" +{len(addresses) - 1}"
    replied = [r for r in record.recipients if r.last_reply]
    last_reply = one_line(max(replied, key=lambda r: r.updated).last_reply or "") \
        if replied else ""
    if len(last_reply) > 60:
        last_reply = last_reply[:59] + "…"
    return (record.id, received.strftime("%Y-%m-%d %H:%M:%S"), summary_status(record),
            one_line(record.sender) or "<>", recipients, last_reply)


def _show(message_id: str, as_json: bool, store: Store, out: TextIO) -> int:
    record = store.show(message_id)
    if record is None:
        return _unknown(message_id)
    message = message_json(record, with_attempts=True)
    if as_json:
        out.write(json.dumps(message) + "\n")
        return 0

    def field(name: str, value: object, indent: str = "") -> None:
        text = "-" if value is None else one_line(value)
        out.write(f"{indent}{name + ':':<14}{text}\n")

    field("id", record.id)
    field("received", f"{message['received']} ({record.received:.3f})")
    field("status", message["status"])
    field("sender", record.sender or "<>")
    field("user", record.user)
    field("peer", record.peer)
    field("size", f"{record.size} bytes")
    field("body", "kept" if record.has_body else "not kept")
    field("trace id", record.trace_id)
    out.write(f"recipients ({len(record.recipients)}):\n")
    for recipient in message["recipients"]:
        out.write(f"  {one_line(recipient['address'])}\n")
        field("status", recipient["status"], "    ")
        field("attempts", recipient["attempts"], "    ")
        field("next attempt", recipient["next_attempt"], "    ")
        field("last reply", recipient["last_reply"], "    ")
        field("updated", recipient["updated"], "    ")
    out.write(f"attempts ({len(record.attempts)}):\n")
    out.writelines(
        f"  {attempt['time']}  {one_line(attempt['recipient'])}  via "
        f"{one_line(attempt['upstream'])}{' (TLS)' if attempt['tls'] else ''}"
        f" in {attempt['duration']:.3f} s: {one_line(attempt['reply'])}\n"
        for attempt in message["attempts"])
    return 0


def _act(action: str, message_id: str, store: Store, out: TextIO) -> int:
    if action == "delete":
        if not store.delete(message_id):
            return _unknown(message_id)
        out.write(f"{message_id}: deleted\n")
        return 0
    count = ACTIONS[action](store, message_id)
    if count == 0 and store.show(message_id) is None:
        return _unknown(message_id)
    out.write(f"{message_id}: {plural(count, 'recipient')} {ACTION_DONE[action]}\n")
    return 0


# The three actions that move recipients between statuses, by their CLI/API name.
ACTIONS: dict[str, Callable[[Store, str], int]] = {
    "retry": lambda store, message_id: store.retry(message_id),
    "hold": lambda store, message_id: store.hold(message_id),
    "release": lambda store, message_id: store.release(message_id),
}
ACTION_DONE = {"retry": "due now", "hold": "held", "release": "released, due now"}


# ---------------------------------------------------------------------------------------
# The HTTP API: /api/v1/...
# ---------------------------------------------------------------------------------------

class ApiError(Exception):
    """An answer other than 200: its status, the text for {"error": ...}, extra headers."""

    def __init__(self, status: int, text: str, headers: dict[str, str] | None = None):
        super().__init__(text)
        self.status = status
        self.text = text
        self.headers = headers or {}


LIST_PARAMETERS = ("status", "rcpt", "from", "user", "since", "until", "limit", "cursor")


class QueueAPI:
    """JSON API under /api/v1/, Bearer tokens compared with hmac.compare_digest.
    read token: GETs except /raw; admin token: everything. No token configured ->
    404 for every /api path (the API is off). Missing/wrong token -> 401 with
    WWW-Authenticate: Bearer. Store calls run in a thread (asyncio.to_thread)."""

    def __init__(self, store: Store, admin_token: str, read_token: str):
        self.store = store
        # Bytes, so that compare_digest never meets non-ASCII str (it refuses it).
        self._admin_token = admin_token.encode("utf-8")
        self._read_token = read_token.encode("utf-8")

    @property
    def enabled(self) -> bool:
        return bool(self._admin_token or self._read_token)

    async def respond(self, method: str, target: str, headers: dict[str, str]
                      ) -> tuple[int, dict[str, str], bytes]:
        """One request: `target` is the request target (path and query), `headers` the
        request's header fields (names in any case; values as the bytes came, decoded
        as latin-1, as http.server does). Returns status, headers, body."""
        try:
            return await self._respond(method, target, headers)
        except ApiError as error:
            return self._json(error.status, {"error": error.text}, error.headers)
        except StoreError as error:  # its message names the problem, never a password
            log_event(logging.ERROR, "api_store_error", error=str(error))
            return self._json(503, {"error": "the queue store is not available"})
        except Exception as error:  # noqa: BLE001 (a bug must not cost the answer)
            log_event(logging.ERROR, "api_error", error=f"{type(error).__name__}: {error}")
            return self._json(500, {"error": "internal error (logged)"})

    async def _respond(self, method: str, target: str,
                       headers: dict[str, str]) -> Response:
        if not self.enabled:
            raise ApiError(404, "not found")
        role = self._role(headers)
        split = urllib.parse.urlsplit(target)
        parts = split.path.split("/")  # "", "api", "v1", ...
        if parts[:3] != ["", "api", "v1"]:
            raise ApiError(404, "not found: the API is under /api/v1/")
        route = parts[3:]
        if route == ["stats"]:
            self._allow(method, "GET")
            return self._json(200, await asyncio.to_thread(self._stats))
        if route == ["messages"]:
            self._allow(method, "GET")
            return await self._list(split.query)
        if len(route) not in (2, 3) or route[0] != "messages":
            raise ApiError(404, "not found")
        message_id = urllib.parse.unquote(route[1])
        if len(route) == 2:
            self._allow(method, "GET", "DELETE")
            if method == "DELETE":
                self._admin(role)
                return await self._delete(message_id)
            return await self._show(message_id)
        if route[2] == "raw":
            self._allow(method, "GET")
            self._admin(role)
            return await self._raw(message_id)
        if route[2] in ACTIONS:
            self._allow(method, "POST")
            self._admin(role)
            return await self._act(route[2], message_id)
        raise ApiError(404, "not found")

    # -- who is asking -------------------------------------------------------------------

    def _role(self, headers: dict[str, str]) -> str:
        """"admin" or "read" for a matching Bearer token, else 401."""
        fields = {name.lower(): value for name, value in headers.items()}
        scheme, _, presented = fields.get("authorization", "").strip().partition(" ")
        if scheme.lower() != "bearer" or not presented.strip():
            raise ApiError(401, "a Bearer token is needed",
                           {"WWW-Authenticate": 'Bearer realm="smtp-relay"'})
        token = _header_bytes(presented.strip())
        # Both comparisons always run, each in constant time; an unset token never
        # matches (an empty one would otherwise equal an empty presentation).
        is_admin = hmac.compare_digest(token, self._admin_token) and bool(self._admin_token)
        is_reader = hmac.compare_digest(token, self._read_token) and bool(self._read_token)
        if is_admin:
            return "admin"
        if is_reader:
            return "read"
        raise ApiError(401, "the token is not valid",
                       {"WWW-Authenticate": 'Bearer realm="smtp-relay", '
                                            'error="invalid_token"'})

    @staticmethod
    def _admin(role: str) -> None:
        if role != "admin":
            raise ApiError(403, "this needs the admin token (API_TOKEN)")

    @staticmethod
    def _allow(method: str, *allowed: str) -> None:
        if method not in allowed and not (method == "HEAD" and "GET" in allowed):
            raise ApiError(405, f"{method} is not allowed here",
                           {"Allow": ", ".join(allowed)})

    # -- the endpoints -------------------------------------------------------------------

    def _stats(self) -> dict[str, Any]:
        stats = dict(self.store.stats(time.time()))
        usage = self.store.usage()
        stats["usage"] = {"messages": usage.messages, "bytes": usage.bytes,
                          "free_bytes": usage.free_bytes}
        return stats

    async def _list(self, query: str) -> Response:
        filters = _list_filters(query)
        try:
            records, cursor = await asyncio.to_thread(self.store.list, **filters)
        except ValueError:  # what the store refuses that we did not check: the cursor
            raise ApiError(400, "cursor is not one this API gave") from None
        return self._json(200, {"messages": [message_json(r) for r in records],
                                "next_cursor": cursor})

    async def _show(self, message_id: str) -> Response:
        _check_id(message_id)
        record = await asyncio.to_thread(self.store.show, message_id)
        if record is None:
            raise ApiError(404, "no such message")
        return self._json(200, message_json(record, with_attempts=True))

    async def _raw(self, message_id: str) -> Response:
        _check_id(message_id)

        def fetch() -> tuple[bytes | None, bool]:
            body = self.store.raw(message_id)
            return body, body is not None or self.store.show(message_id) is not None

        body, known = await asyncio.to_thread(fetch)
        if not known:
            raise ApiError(404, "no such message")
        if body is None:
            raise ApiError(404, "the message's body is not kept (ARCHIVE=metadata, or "
                                "it was delivered with ARCHIVE=off)")
        return 200, {"Content-Type": "message/rfc822",
                     "Content-Disposition": f'attachment; filename="{message_id}.eml"',
                     "Cache-Control": "no-store"}, body

    async def _act(self, action: str, message_id: str) -> Response:
        _check_id(message_id)

        def run() -> tuple[int, bool]:
            count = ACTIONS[action](self.store, message_id)
            return count, count > 0 or self.store.show(message_id) is not None

        count, known = await asyncio.to_thread(run)
        if not known:
            raise ApiError(404, "no such message")
        log_event(logging.INFO, f"api_{action}", id=message_id, recipients=count)
        return self._json(200, {"id": message_id, "recipients": count})

    async def _delete(self, message_id: str) -> Response:
        _check_id(message_id)
        if not await asyncio.to_thread(self.store.delete, message_id):
            raise ApiError(404, "no such message")
        log_event(logging.INFO, "api_delete", id=message_id)
        return self._json(200, {"id": message_id, "deleted": True})

    @staticmethod
    def _json(status: int, value: object,
              headers: dict[str, str] | None = None) -> Response:
        body = (json.dumps(value) + "\n").encode("utf-8")
        # no-store: queue records name people and may hold replies worth keeping private
        return status, {"Content-Type": JSON_TYPE, "Cache-Control": "no-store",
                        **(headers or {})}, body


def _check_id(message_id: str) -> None:
    if not MESSAGE_ID.fullmatch(message_id):
        raise ApiError(404, "no such message")


def _header_bytes(value: str) -> bytes:
    """A header value back to the bytes that came (HTTPEndpoint decodes as latin-1);
    text that cannot have come that way is taken as UTF-8."""
    try:
        return value.encode("latin-1")
    except UnicodeEncodeError:
        return value.encode("utf-8", "surrogatepass")


def _list_filters(query: str) -> dict[str, Any]:
    """GET /api/v1/messages' query as Store.list keywords; ApiError 400 when bad."""
    try:
        pairs = urllib.parse.parse_qsl(query, keep_blank_values=True,
                                       strict_parsing=bool(query), errors="strict")
    except (ValueError, UnicodeDecodeError):
        raise ApiError(400, "the query string is not well formed") from None
    given: dict[str, str] = {}
    for name, text in pairs:
        if name not in LIST_PARAMETERS:
            raise ApiError(400, f"unknown parameter {one_line(name)!r}; known: "
                                + ", ".join(LIST_PARAMETERS))
        if name in given:
            raise ApiError(400, f"parameter {name!r} given twice")
        given[name] = text
    filters: dict[str, Any] = {"limit": LIST_LIMIT_DEFAULT}
    if given.get("status"):
        if given["status"] not in STATUSES:
            raise ApiError(400, "status must be one of " + ", ".join(STATUSES))
        filters["status"] = given["status"]
    for name, keyword in (("rcpt", "rcpt"), ("user", "user"), ("cursor", "cursor")):
        if given.get(name):
            filters[keyword] = given[name]
    if given.get("from"):
        filters["sender"] = null_sender(given["from"])
    for name in ("since", "until"):
        if given.get(name):
            try:
                filters[name] = parse_time(given[name])
            except ValueError:
                raise ApiError(400, f"{name} must be unix seconds or an ISO 8601 "
                                    "time") from None
    if given.get("limit"):
        text = given["limit"]
        if not re.fullmatch(r"[0-9]{1,4}", text) or not 1 <= int(text) <= LIST_LIMIT_MAX:
            raise ApiError(400, f"limit must be 1 to {LIST_LIMIT_MAX}")
        filters["limit"] = int(text)
    return filters

