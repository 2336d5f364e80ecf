"""smtp_relay.py overrides private parts of aiosmtpd; these tests fail on an upgrade
that changes them, before the relay silently loses a behaviour.

The behaviours themselves are tested end to end elsewhere; here only the contract with
aiosmtpd's internals is pinned.
"""

import inspect

import aiosmtpd
from aiosmtpd.smtp import SMTP, Session

import smtp_relay


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
    assert "_timeout_duration" in inspect.getsource(SMTP.__init__)


def test_data_reader_contract():
    # smtp_relay's smtp_DATA reads self._reader's buffer and limit directly.
    source = inspect.getsource(SMTP.__init__)
    assert "asyncio.StreamReader(loop=self.loop, limit=self.line_length_limit)" in source
    assert "self._reader = reader" in inspect.getsource(SMTP._cb_client_connected)


def test_session_factory_contract():
    assert "self._create_session()" in inspect.getsource(SMTP.connection_made)
    assert issubclass(smtp_relay.RelaySession, Session)


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
