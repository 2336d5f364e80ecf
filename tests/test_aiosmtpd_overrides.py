"""smtp_relay.py overrides private parts of aiosmtpd; these tests fail on an upgrade
that changes them, before the relay silently loses a behaviour.

The behaviours themselves are tested end to end elsewhere; here only the contract with
aiosmtpd's internals is pinned.
"""

import asyncio
import collections
import collections.abc
import gc
import inspect
import weakref

import aiosmtpd
from aiosmtpd.smtp import SMTP, Session

import smtp_relay
from relay.protocol import RelaySession, RelaySMTP
from relay.settings import load_config


def test_aiosmtpd_is_the_pinned_version():
    assert aiosmtpd.__version__ == "1.4.6", (
        "aiosmtpd changed: re-check every override listed in this file, then update "
        "requirements.txt and this test")


def test_getaddr_contract():
    # smtp_MAIL / smtp_RCPT call self._getaddr(arg) -> (address, rest).
    source = inspect.getsource(SMTP.smtp_MAIL) + inspect.getsource(SMTP.smtp_RCPT)
    assert source.count("self._getaddr(arg)") == 2
    assert list(inspect.signature(SMTP._getaddr).parameters) == ["self", "arg"]


def test_timeout_callback_contract():
    # _reset_timeout() with no argument means "a valid command arrived".
    assert list(inspect.signature(SMTP._timeout_cb).parameters) == ["self"]
    assert list(inspect.signature(SMTP._reset_timeout).parameters) == ["self", "duration"]
    assert "self._reset_timeout()" in inspect.getsource(SMTP._handle_client)
    assert "self._timeout_cb" in inspect.getsource(SMTP._reset_timeout)
    # ...and it keeps the one timer in _timeout_handle (RelaySMTP reuses it).
    assert "self._timeout_handle = self.loop.call_later(" in inspect.getsource(
        SMTP._reset_timeout)
    assert "_timeout_duration" in inspect.getsource(SMTP.__init__)


def test_data_reader_contract():
    # smtp_relay's smtp_DATA reads self._reader's buffer and limit directly.
    source = inspect.getsource(SMTP.__init__)
    assert "asyncio.StreamReader(loop=self.loop, limit=self.line_length_limit)" in source
    assert "self._reader = reader" in inspect.getsource(SMTP._cb_client_connected)


def test_session_factory_contract():
    assert "self._create_session()" in inspect.getsource(SMTP.connection_made)
    assert issubclass(RelaySession, Session)


def test_handle_client_and_starttls_contracts():
    # _handle_client is wrapped (the connection checker runs before the greeting);
    # smtp_STARTTLS is wrapped (no TLS inside TLS); TLSSetupException reaches
    # handle_exception when a handshake fails.
    assert list(inspect.signature(SMTP._handle_client).parameters) == ["self"]
    assert "await self.push('220 {} {}'" in inspect.getsource(SMTP._handle_client)
    assert "raise TLSSetupException() from error" in inspect.getsource(
        SMTP.smtp_STARTTLS)
    assert "isinstance(error, TLSSetupException)" in inspect.getsource(
        SMTP._handle_client)


def test_starttls_flag_and_buffer_clearing():
    # The Received: header reads server._tls_protocol; STARTTLS injection protection
    # relies on aiosmtpd discarding what was pipelined behind STARTTLS.
    assert "self._tls_protocol = " in inspect.getsource(SMTP.smtp_STARTTLS)
    assert "_buffer.clear()" in inspect.getsource(SMTP.connection_made)


def test_handler_hook_return_contract():
    # A hook that returns a status must set envelope fields itself: aiosmtpd only does
    # so when the hook returns MISSING.
    mail = inspect.getsource(SMTP.smtp_MAIL)
    assert "if status is MISSING:\n            self.envelope.mail_from = address" in mail
    ehlo = inspect.getsource(SMTP.smtp_EHLO)
    assert "self.session.host_name = hostname" in ehlo  # only without a hook


def test_login_data_property_still_warns():
    # RelaySession shadows this deprecated property to keep the log clean.
    assert isinstance(inspect.getattr_static(Session, "login_data"), property)


# RelaySMTP builds a connection's protocol from what aiosmtpd's SMTP.__init__ worked out
# for the first one (its introspection costs ~230 us per connection).

def _relay_server(tmp_path):
    config = load_config({
        "SMTP_AUTH_USERNAME": "user", "SMTP_AUTH_PASSWORD": "pw-0123456789",
        "ALLOWED_FROM_DOMAINS": "example.com", "ALLOWED_TO_DOMAINS": "example.com",
        "RELAY_HOST": "127.0.0.1", "LOG_FILE": str(tmp_path / "relay.log"),
        "AUTH_MECHANISMS": "PLAIN,LOGIN,CRAM-MD5"})
    return smtp_relay.SMTPRelayServer(config)


def _same_attribute(name, first, second, a, b):
    """Attribute `name` of protocol `a` (built by SMTP.__init__) and of `b` agree."""
    if isinstance(a, dict):
        # the template's tables are shared dicts, or MethodTables that bind on lookup
        assert isinstance(b, collections.abc.Mapping) and a.keys() == b.keys(), name
        for key in a:
            _same_attribute(f"{name}[{key!r}]", first, second, a[key], b[key])
    elif isinstance(a, tuple) and hasattr(a, "_fields"):  # aiosmtpd's _AuthMechAttr
        assert type(a) is type(b), name
        for field, x, y in zip(a._fields, a, b):
            _same_attribute(f"{name}.{field}", first, second, x, y)
    elif inspect.ismethod(a) and a.__self__ is first:
        assert inspect.ismethod(b) and b.__self__ is second, name
        assert b.__func__ is a.__func__, name
    elif a is None or isinstance(a, (bool, int, float, str)):
        assert a == b and type(a) is type(b), name
    else:
        assert type(a) is type(b), name


def test_protocols_after_the_first_skip_aiosmtpd_introspection(tmp_path, monkeypatch):
    async def build():
        server = _relay_server(tmp_path)
        try:
            first = server._make_protocol()
            calls = []
            for name in ("getmembers", "signature"):
                original = getattr(inspect, name)
                monkeypatch.setattr(inspect, name, lambda *a, _f=original, _n=name, **k:
                                    calls.append(_n) or _f(*a, **k))
            server._make_protocol()
            return first, calls
        finally:
            await server.forwarder.close()
    first, calls = asyncio.run(build())
    assert isinstance(first, RelaySMTP)
    assert calls == []


def test_protocol_from_the_template_matches_aiosmtpd_init(tmp_path):
    # Every attribute SMTP.__init__ sets, with the same value; methods bound to the
    # protocol itself bound to the new one; per-connection objects (the stream reader,
    # futures, queues) new, not shared.
    async def build():
        server = _relay_server(tmp_path)
        try:
            return server._make_protocol(), server._make_protocol()
        finally:
            await server.forwarder.close()
    first, second = asyncio.run(build())
    assert vars(first).keys() == vars(second).keys()
    assert "_auth_methods" in vars(first) and "CRAM-MD5" in first._auth_methods
    for name, value in vars(first).items():
        other = vars(second)[name]
        _same_attribute(name, first, second, value, other)
        if isinstance(value, (asyncio.Future, collections.deque, weakref.ref)) or (
                name == "_strong_reader"):
            assert other is not value, name
    assert second._stream_reader is not first._stream_reader
    assert second._smtp_methods["DATA"].__func__ is RelaySMTP.smtp_DATA


def test_the_template_does_not_keep_the_first_connection_alive(tmp_path):
    async def build():
        server = _relay_server(tmp_path)
        try:
            protocol = server._make_protocol()
            server.connections.discard(protocol)  # the slot, as when it closes
            first = weakref.ref(protocol)
            del protocol
            gc.collect()
            return first, server.protocol_templates
        finally:
            await server.forwarder.close()
    first, templates = asyncio.run(build())
    assert templates and first() is None


def test_what_the_template_copies_is_fixed_by_the_options():
    # The template copies what SMTP.__init__ derives from its arguments and the classes;
    # it replays the one side effect (the class-wide command_size_limits reset).
    source = inspect.getsource(SMTP.__init__)
    assert "self.command_size_limits.clear()" in source
    assert source.count("inspect.") == 2 and source.count("dir(") == 2
    assert "super().__init__(\n            asyncio.StreamReader(loop=self.loop, " \
        "limit=self.line_length_limit),\n            client_connected_cb=" \
        "self._cb_client_connected,\n            loop=self.loop)" in source


def test_push_contract():
    # RelaySMTP.push hands aiosmtpd's push bytes (whole replies, several lines joined
    # by CRLF) and encodes str as aiosmtpd does; EHLO's lines come one push each.
    push = inspect.getsource(SMTP.push)
    assert "status, 'utf-8' if self.enable_SMTPUTF8 else 'ascii')" in push
    assert 'self._writer.write(response + b"\\r\\n")' in push
    assert "for r in response:\n            await self.push(r)" in inspect.getsource(
        SMTP.smtp_EHLO)


def test_grouped_commands_keep_aiosmtpd_behaviour():
    # smtp_RSET/MAIL/RCPT are aiosmtpd's own, wrapped (the HELP text copied); their
    # replies go through push, and the next command line waits in _reader._buffer.
    for name in ("smtp_RSET", "smtp_MAIL", "smtp_RCPT"):
        ours, theirs = getattr(RelaySMTP, name), getattr(SMTP, name)
        # (smtp_MAIL wraps the relay's own, which checks SIZE and calls aiosmtpd's.)
        assert ours.__wrapped__ is theirs or (
            name == "smtp_MAIL" and "await super().smtp_MAIL(arg)" in
            inspect.getsource(ours.__wrapped__))
        assert ours.__smtp_syntax__ == theirs.__smtp_syntax__
        assert ours.__smtp_syntax_extended__ == theirs.__smtp_syntax_extended__
        assert "self.transport.write" not in inspect.getsource(theirs)
    assert "line: bytes = await self._reader.readuntil()" in inspect.getsource(
        SMTP._handle_client)


def test_sanitized_log_contract():
    # relay.protocol replaces aiosmtpd.smtp.sanitized_log (a module global smtp.py
    # looks up at each call) by one that skips lines mail.log would drop.
    import aiosmtpd.smtp

    import relay.protocol
    assert aiosmtpd.smtp.sanitized_log is relay.protocol._sanitized_log
    original = relay.protocol._escaped_log
    assert list(inspect.signature(original).parameters) == ["func", "msg", "args", "kwargs"]
    assert "sanitized_log(log.info, '%r >> %r'" in inspect.getsource(SMTP._handle_client)
