"""Configuration: load_config's defaults, parsing and errors, and the real program's
start-up: exit status 2 with one clear line for a bad setting, `.env` files, the
start-up log (secrets redacted, warnings for unsafe settings) and LOG_FILE's directory.
"""

from __future__ import annotations

import base64
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import PASSWORD, SMTP_RELAY, USER, RawClient, RelayProcess, relay_env

from relay.settings import ConfigError, load_config

ERROR_PREFIX = "smtp-relay: configuration error:"


@pytest.fixture
def tls_files(tmp_path) -> dict[str, str]:
    """Existing (if empty) files, enough for load_config's USE_TLS checks."""
    cert, key = tmp_path / "server.crt", tmp_path / "server.key"
    cert.write_text("")
    key.write_text("")
    return {"TLS_CERT_FILE": str(cert), "TLS_KEY_FILE": str(key)}


def config_error(env: dict[str, str]) -> str:
    with pytest.raises(ConfigError) as caught:
        load_config(env)
    return str(caught.value)


# ---------------------------------------------------------------------------------------
# load_config
# ---------------------------------------------------------------------------------------

DEFAULTS = {
    "auth_username": "user",
    "auth_password": "password",
    "listen_host": "0.0.0.0",
    "listen_port": 1025,
    "use_tls": False,
    "tls_cert_file": "/etc/certs/server.crt",
    "tls_key_file": "/etc/certs/server.key",
    "relay_host": "smtp.example.com",
    "relay_port": 25,
    "relay_use_tls": True,
    "relay_use_ssl": False,
    "relay_username": "",
    "relay_password": "",
    "relay_tls_verify": True,
    "relay_tls_ca_file": "",
    "relay_pool_idle_seconds": 15,
    "relay_pool_max_messages": 100,
    "max_connections": 50,
    "timeout": 60,
    "log_file": "logs/smtp-relay.log",
    "log_level": "INFO",
    "max_message_size": 10485760,
    "max_recipients": 100,
}


def test_defaults():
    config = load_config({})
    assert {name: getattr(config, name) for name in DEFAULTS} == DEFAULTS
    for domains in (config.allowed_from_domains, config.allowed_to_domains):
        assert str(domains) == "example.com"
        assert domains.allows("example.com")
        assert not domains.allows("a.example.com")


def test_default_smtp_hostname_is_the_machine_name():
    hostname = socket.gethostname()
    if not re.fullmatch(r"[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?", hostname):
        pytest.skip(f"this machine's name {hostname!r} is not a valid host name")
    assert load_config({}).smtp_hostname == hostname


def test_empty_values_mean_the_default():
    config = load_config({"LISTEN_PORT": "", "USE_TLS": " ", "TIMEOUT": "",
                          "SMTP_HOSTNAME": ""})
    assert config.listen_port == 1025
    assert config.use_tls is False
    assert config.timeout == 60
    assert config.smtp_hostname == load_config({}).smtp_hostname


TRUE_SPELLINGS = ["true", "True", "TRUE", "yes", "Yes", "YES", "1", " true "]
FALSE_SPELLINGS = ["false", "False", "FALSE", "no", "No", "NO", "0", " no "]
BOOLEANS = [
    # (variable, attribute, settings that keep the rest of the config consistent)
    ("USE_TLS", "use_tls", {}),
    ("RELAY_USE_TLS", "relay_use_tls", {}),
    ("RELAY_USE_SSL", "relay_use_ssl", {"RELAY_USE_TLS": "false"}),
    ("RELAY_TLS_VERIFY", "relay_tls_verify", {}),
]


@pytest.mark.parametrize("raw", TRUE_SPELLINGS + FALSE_SPELLINGS)
@pytest.mark.parametrize(("name", "attribute", "others"), BOOLEANS,
                         ids=[b[0] for b in BOOLEANS])
def test_boolean_spellings(name, attribute, others, raw, tls_files):
    config = load_config({**tls_files, **others, name: raw})
    assert getattr(config, attribute) is (raw in TRUE_SPELLINGS)


@pytest.mark.parametrize("raw", ["maybe", "2", "-1", "truee", "y", "enabled", "t"])
@pytest.mark.parametrize("name", [b[0] for b in BOOLEANS])
def test_unknown_boolean_names_the_variable(name, raw):
    message = config_error({name: raw})
    assert message.startswith(f"{name}={raw!r}")
    assert "true/false" in message


@pytest.mark.parametrize(("name", "raw", "attribute", "value"), [
    ("LISTEN_PORT", "2525", "listen_port", 2525),
    ("LISTEN_PORT", "0", "listen_port", 0),
    ("LISTEN_PORT", "65535", "listen_port", 65535),
    ("LISTEN_PORT", " 587 ", "listen_port", 587),
    ("RELAY_PORT", "465", "relay_port", 465),
    ("MAX_CONNECTIONS", "7", "max_connections", 7),
    ("TIMEOUT", "2.5", "timeout", 2.5),
    ("TIMEOUT", "3600", "timeout", 3600.0),
    ("MAX_MESSAGE_SIZE", "2048", "max_message_size", 2048),
    ("MAX_RECIPIENTS", "3", "max_recipients", 3),
    ("RELAY_POOL_IDLE_SECONDS", "0", "relay_pool_idle_seconds", 0.0),
    ("RELAY_POOL_IDLE_SECONDS", "0.5", "relay_pool_idle_seconds", 0.5),
    ("RELAY_POOL_MAX_MESSAGES", "1", "relay_pool_max_messages", 1),
])
def test_numbers(name, raw, attribute, value):
    config = load_config({name: raw})
    assert getattr(config, attribute) == value
    assert isinstance(getattr(config, attribute), type(value))


def test_text_settings():
    config = load_config({
        "SMTP_AUTH_USERNAME": " app ", "SMTP_AUTH_PASSWORD": " pass word ",
        "LISTEN_HOST": "127.0.0.1", "RELAY_HOST": "smtp.example.net",
        "RELAY_USERNAME": "relay-user", "RELAY_PASSWORD": "relay-secret",
        "LOG_FILE": "/tmp/x.log", "LOG_LEVEL": "debug", "SMTP_HOSTNAME": "mx.example.com",
    })
    assert config.auth_username == "app"
    assert config.auth_password == " pass word "  # a password is taken as written
    assert (config.listen_host, config.relay_host) == ("127.0.0.1", "smtp.example.net")
    assert (config.relay_username, config.relay_password) == ("relay-user", "relay-secret")
    assert (config.log_file, config.log_level) == ("/tmp/x.log", "DEBUG")
    assert config.smtp_hostname == "mx.example.com"


def test_domain_lists():
    config = load_config({"ALLOWED_FROM_DOMAINS": "Example.COM, *.example.org",
                          "ALLOWED_TO_DOMAINS": "bücher.example,example.net."})
    assert str(config.allowed_from_domains) == "example.com,*.example.org"
    assert str(config.allowed_to_domains) == "example.net,xn--bcher-kva.example"
    assert config.allowed_from_domains.allows("a.example.org")
    assert not config.allowed_from_domains.allows("example.org")
    assert not config.allowed_to_domains.allows("example.com")


def test_secrets_are_redacted_in_repr():
    config = load_config({"SMTP_AUTH_PASSWORD": "auth-Secret-1", "RELAY_USERNAME": "r",
                          "RELAY_PASSWORD": "relay-Secret-2"})
    text = repr(config)
    assert "auth-Secret-1" not in text and "relay-Secret-2" not in text
    assert config.redacted()["auth_password"] == "***"
    assert config.redacted()["relay_password"] == "***"


CONFIG_ERRORS = [
    pytest.param({"LISTEN_PORT": "http"}, "LISTEN_PORT", id="port-not-a-number"),
    pytest.param({"LISTEN_PORT": "25.5"}, "LISTEN_PORT", id="port-fraction"),
    pytest.param({"LISTEN_PORT": "65536"}, "LISTEN_PORT", id="port-too-big"),
    pytest.param({"LISTEN_PORT": "-1"}, "LISTEN_PORT", id="port-negative"),
    pytest.param({"RELAY_PORT": "0"}, "RELAY_PORT", id="relay-port-zero"),
    pytest.param({"RELAY_PORT": "smtp"}, "RELAY_PORT", id="relay-port-not-a-number"),
    pytest.param({"USE_TLS": "sometimes"}, "USE_TLS", id="unknown-boolean"),
    pytest.param({"RELAY_USE_TLS": "true", "RELAY_USE_SSL": "true"}, "RELAY_USE_SSL",
                 id="both-tls-modes"),
    pytest.param({"ALLOWED_TO_DOMAINS": ""}, "ALLOWED_TO_DOMAINS", id="empty-list"),
    pytest.param({"ALLOWED_FROM_DOMAINS": " , "}, "ALLOWED_FROM_DOMAINS",
                 id="blank-list"),
    pytest.param({"ALLOWED_TO_DOMAINS": "example.com,,example.org"}, "ALLOWED_TO_DOMAINS",
                 id="empty-entry"),
    pytest.param({"ALLOWED_TO_DOMAINS": "example.com,"}, "ALLOWED_TO_DOMAINS",
                 id="trailing-comma"),
    pytest.param({"ALLOWED_FROM_DOMAINS": "exa mple.com"}, "ALLOWED_FROM_DOMAINS",
                 id="domain-with-space"),
    pytest.param({"ALLOWED_TO_DOMAINS": "*"}, "ALLOWED_TO_DOMAINS", id="bare-wildcard"),
    pytest.param({"ALLOWED_TO_DOMAINS": "a.*.example.com"}, "ALLOWED_TO_DOMAINS",
                 id="inner-wildcard"),
    pytest.param({"ALLOWED_TO_DOMAINS": "user@example.com"}, "ALLOWED_TO_DOMAINS",
                 id="address-not-domain"),
    pytest.param({"ALLOWED_TO_DOMAINS": "[10.0.0.1]"}, "ALLOWED_TO_DOMAINS",
                 id="ip-literal"),
    pytest.param({"ALLOWED_TO_DOMAINS": "10.0.0.1"}, "ALLOWED_TO_DOMAINS", id="ip"),
    pytest.param({"LOG_LEVEL": "verbose"}, "LOG_LEVEL", id="bad-log-level"),
    pytest.param({"LOG_LEVEL": "CRITICAL"}, "LOG_LEVEL", id="unlisted-log-level"),
    pytest.param({"USE_TLS": "true", "TLS_CERT_FILE": "/nonexistent/server.crt"},
                 "TLS_CERT_FILE", id="missing-cert"),
    pytest.param({"USE_TLS": "yes", "TLS_CERT_FILE": __file__,
                  "TLS_KEY_FILE": "/nonexistent/server.key"}, "TLS_KEY_FILE",
                 id="missing-key"),
    pytest.param({"RELAY_USERNAME": "relay-user", "RELAY_USE_TLS": "false"},
                 "RELAY_USERNAME", id="credentials-in-clear"),
    pytest.param({"RELAY_PASSWORD": "secret"}, "RELAY_USERNAME",
                 id="password-without-user"),
    pytest.param({"RELAY_TLS_CA_FILE": "/nonexistent/ca.pem"}, "RELAY_TLS_CA_FILE",
                 id="missing-ca-file"),
    pytest.param({"TIMEOUT": "0"}, "TIMEOUT", id="timeout-zero"),
    pytest.param({"TIMEOUT": "-5"}, "TIMEOUT", id="timeout-negative"),
    pytest.param({"TIMEOUT": "nan"}, "TIMEOUT", id="timeout-nan"),
    pytest.param({"TIMEOUT": "inf"}, "TIMEOUT", id="timeout-inf"),
    pytest.param({"TIMEOUT": "soon"}, "TIMEOUT", id="timeout-not-a-number"),
    pytest.param({"MAX_CONNECTIONS": "0"}, "MAX_CONNECTIONS", id="max-connections-zero"),
    pytest.param({"MAX_CONNECTIONS": "many"}, "MAX_CONNECTIONS",
                 id="max-connections-not-a-number"),
    pytest.param({"MAX_RECIPIENTS": "0"}, "MAX_RECIPIENTS", id="max-recipients-zero"),
    pytest.param({"MAX_MESSAGE_SIZE": "10"}, "MAX_MESSAGE_SIZE", id="tiny-message-size"),
    pytest.param({"RELAY_POOL_IDLE_SECONDS": "-1"}, "RELAY_POOL_IDLE_SECONDS",
                 id="negative-idle"),
    pytest.param({"RELAY_POOL_MAX_MESSAGES": "0"}, "RELAY_POOL_MAX_MESSAGES",
                 id="pool-max-messages-zero"),
    pytest.param({"SMTP_AUTH_USERNAME": " "}, "SMTP_AUTH_USERNAME", id="empty-username"),
    pytest.param({"SMTP_AUTH_PASSWORD": ""}, "SMTP_AUTH_PASSWORD", id="empty-password"),
    pytest.param({"LISTEN_HOST": ""}, "LISTEN_HOST", id="empty-listen-host"),
    pytest.param({"RELAY_HOST": "smtp example.com"}, "RELAY_HOST", id="relay-host-space"),
    pytest.param({"SMTP_HOSTNAME": "relay_1!"}, "SMTP_HOSTNAME", id="bad-hostname"),
]


@pytest.mark.parametrize(("env", "name"), CONFIG_ERRORS)
def test_config_error_names_the_variable(env, name):
    message = config_error(env)
    assert name in message
    assert "expects" in message
    assert "\n" not in message


def test_config_error_quotes_the_bad_value():
    assert config_error({"LISTEN_PORT": "99999"}) == (
        "LISTEN_PORT='99999': expects a whole number at least 0 and at most 65535")
    assert config_error({"TIMEOUT": "nan"}).startswith("TIMEOUT='nan': expects a number")


# ---------------------------------------------------------------------------------------
# The real program: bad settings stop it with status 2 and one line
# ---------------------------------------------------------------------------------------

def run_relay(workdir: Path, env: dict[str, str], *args: str,
              timeout: float = 20) -> subprocess.CompletedProcess:
    """Run the relay to completion: only for configurations it must refuse."""
    return subprocess.run([sys.executable, str(SMTP_RELAY), *args], cwd=workdir, env=env,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=timeout, check=False)


def assert_refused(result: subprocess.CompletedProcess, name: str) -> str:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(ERROR_PREFIX)
    assert name in lines[0]
    return lines[0]


@pytest.mark.parametrize(("overrides", "name"), [
    pytest.param({"LISTEN_PORT": "smtp"}, "LISTEN_PORT", id="port-not-a-number"),
    pytest.param({"LISTEN_PORT": "70000"}, "LISTEN_PORT", id="port-out-of-range"),
    pytest.param({"USE_TLS": "perhaps"}, "USE_TLS", id="unknown-boolean"),
    pytest.param({"USE_TLS": "true", "TLS_CERT_FILE": "missing.crt"}, "TLS_CERT_FILE",
                 id="missing-cert"),
    pytest.param({"RELAY_USE_TLS": "true", "RELAY_USE_SSL": "true"}, "RELAY_USE_SSL",
                 id="both-tls-modes"),
    pytest.param({"ALLOWED_TO_DOMAINS": ""}, "ALLOWED_TO_DOMAINS", id="empty-domains"),
])
def test_program_refuses_bad_setting(tmp_path, overrides, name):
    assert_refused(run_relay(tmp_path, relay_env(tmp_path, None, **overrides)), name)


def test_program_refuses_a_certificate_that_is_not_pem(tmp_path):
    cert, key = tmp_path / "server.crt", tmp_path / "server.key"
    cert.write_text("this is not a certificate\n")
    key.write_bytes(b"\x00\x01junk")
    env = relay_env(tmp_path, None, USE_TLS="true", TLS_CERT_FILE=cert,
                    TLS_KEY_FILE=key)
    assert_refused(run_relay(tmp_path, env), "TLS_CERT_FILE")


def test_program_refuses_a_port_in_use(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run_relay(tmp_path, relay_env(tmp_path, None, LISTEN_PORT=port))
    line = assert_refused(result, "LISTEN_PORT")
    assert str(port) in line


def test_program_refuses_an_unwritable_log_file(tmp_path):
    regular_file = tmp_path / "not-a-directory"
    regular_file.write_text("")
    env = relay_env(tmp_path, None, LOG_FILE=regular_file / "logs" / "relay.log")
    assert_refused(run_relay(tmp_path, env), "LOG_FILE")


def test_program_refuses_an_unknown_subcommand(tmp_path):
    result = run_relay(tmp_path, relay_env(tmp_path, None), "frobnicate")
    assert result.returncode == 2
    assert "usage:" in result.stderr
    assert "Traceback" not in result.stderr


# ---------------------------------------------------------------------------------------
# The real program: .env, the start-up log, LOG_FILE
# ---------------------------------------------------------------------------------------

@pytest.fixture
def launch(tmp_path):
    """launch(dotenv=..., VAR=value or None to unset) -> a ready RelayProcess whose
    working directory holds `dotenv` as its .env file."""
    started: list[RelayProcess] = []

    def start(dotenv: str | None = None, **overrides: object) -> RelayProcess:
        workdir = tmp_path / f"run{len(started)}"
        workdir.mkdir()
        if dotenv is not None:
            (workdir / ".env").write_text(dotenv)
        env = relay_env(workdir, None)
        for name, value in overrides.items():
            if value is None:
                env.pop(name, None)
            else:
                env[name] = str(value)
        relay = RelayProcess(workdir, env)
        started.append(relay)
        return relay.wait_ready()

    yield start
    for relay in started:
        relay.stop(signal.SIGKILL)


def auth_plain(port: int, user: str, password: str) -> str:
    client = RawClient(port, timeout=10)
    try:
        assert client.command("EHLO client.test").startswith("250")
        token = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
        return client.command(f"AUTH PLAIN {token}")
    finally:
        client.close()


def auth_login(port: int, user: str, password: str) -> str:
    client = RawClient(port, timeout=10)
    try:
        assert client.command("EHLO client.test").startswith("250")
        assert client.command("AUTH LOGIN").startswith("334")
        assert client.command(base64.b64encode(user.encode())).startswith("334")
        return client.command(base64.b64encode(password.encode()))
    finally:
        client.close()


def banner(port: int) -> str:
    client = RawClient(port, timeout=10)
    client.close()
    return client.banner


def test_dotenv_in_the_working_directory_is_read(launch):
    relay = launch(dotenv="SMTP_AUTH_PASSWORD=dotenv-Pa55\n"
                          "SMTP_HOSTNAME=dotenv.test\n",
                   SMTP_AUTH_PASSWORD=None, SMTP_HOSTNAME=None)
    assert auth_plain(relay.port, USER, "dotenv-Pa55").startswith("235")
    assert auth_plain(relay.port, USER, PASSWORD).startswith("535")
    assert banner(relay.port).startswith("220 dotenv.test ")


def test_environment_wins_over_dotenv(launch):
    relay = launch(dotenv="SMTP_AUTH_PASSWORD=dotenv-Pa55\n"
                          "SMTP_HOSTNAME=dotenv.test\n")
    assert auth_plain(relay.port, USER, PASSWORD).startswith("235")
    assert auth_plain(relay.port, USER, "dotenv-Pa55").startswith("535")
    assert banner(relay.port).startswith("220 relay.test ")


def started_line(text: str) -> str:
    lines = [line for line in text.splitlines() if " INFO started " in line]
    assert len(lines) == 1, text
    return lines[0]


def warnings(text: str) -> list[str]:
    return [line for line in text.splitlines() if " WARNING " in line]


def test_startup_log_shows_the_configuration_without_secrets(launch, tmp_path):
    auth_secret, relay_secret = "Auth-Secret-7f3a", "Relay-Secret-9c1e"
    log_file = tmp_path / "deep" / "er" / "logs" / "relay.log"
    relay = launch(SMTP_AUTH_PASSWORD=auth_secret, RELAY_USE_TLS="true",
                   RELAY_USERNAME="relay-user", RELAY_PASSWORD=relay_secret,
                   LOG_LEVEL="DEBUG", LOG_FILE=log_file)
    # Logins, good and bad, by both mechanisms: nothing of the password is logged.
    assert auth_plain(relay.port, USER, auth_secret).startswith("235")
    assert auth_login(relay.port, USER, auth_secret).startswith("235")
    assert auth_plain(relay.port, USER, relay_secret).startswith("535")
    assert auth_login(relay.port, USER, relay_secret + "x").startswith("535")
    relay.wait_for_log("auth-failed")
    assert relay.stop() == 0
    log, stderr = log_file.read_text(), relay.stderr
    for text in (log, stderr):
        line = started_line(text)
        assert f"listen=127.0.0.1:{relay.port}" in line
        for shown in ("auth_username=relayuser", "auth_password=***",
                      "relay_username=relay-user", "relay_password=***",
                      "relay_host=127.0.0.1", "relay_use_tls=True", "use_tls=False",
                      "allowed_to_domains=example.com,*.example.org",
                      "allowed_from_domains=example.com", "log_level=DEBUG",
                      "smtp_hostname=relay.test", "timeout=10.0"):
            assert shown in line.split(), shown
        for secret in (auth_secret, relay_secret):
            assert secret not in text
            assert base64.b64encode(secret.encode()).decode() not in text
    assert "auth-ok" in log


def test_startup_warns_about_unsafe_settings(launch):
    relay = launch(SMTP_AUTH_PASSWORD=None, USE_TLS="false", RELAY_USE_TLS="true",
                   RELAY_TLS_VERIFY="false")
    for text in (relay.wait_for_log("RELAY_TLS_VERIFY"), relay.stderr):
        found = warnings(text)
        assert any("SMTP_AUTH_PASSWORD is the default" in line for line in found), text
        assert any("USE_TLS is off" in line and "plaintext" in line
                   for line in found), text
        assert any("RELAY_TLS_VERIFY is off" in line for line in found), text
    # The default password itself is public: the warning may name it.
    assert auth_plain(relay.port, "relayuser", "password").startswith("235")


def test_startup_has_no_warnings_when_everything_is_safe(launch, server_cert):
    cert_file, key_file, ca_file = server_cert
    relay = launch(USE_TLS="true", TLS_CERT_FILE=cert_file, TLS_KEY_FILE=key_file,
                   RELAY_USE_TLS="true", RELAY_TLS_VERIFY="true",
                   RELAY_TLS_CA_FILE=ca_file)
    assert relay.stop() == 0  # the whole start-up has been logged
    log = relay.log()
    assert warnings(log) == []
    assert warnings(relay.stderr) == []
    assert "use_tls=True" in started_line(log).split()


def test_no_verify_warning_without_tls_to_the_upstream(launch):
    relay = launch(RELAY_USE_TLS="false", RELAY_TLS_VERIFY="false")
    assert relay.stop() == 0  # the whole start-up has been logged
    log = relay.log()
    assert not any("RELAY_TLS_VERIFY" in line for line in warnings(log))
    assert any("RELAY_USE_TLS and RELAY_USE_SSL are off" in line
               for line in warnings(log))


def test_log_file_directory_is_created(launch, tmp_path):
    log_file = tmp_path / "new" / "nested" / "dir" / "relay.log"
    assert not log_file.parent.exists()
    relay = launch(LOG_FILE=log_file)
    assert log_file.parent.is_dir()
    assert "started" in relay.wait_for_log(" started ")
