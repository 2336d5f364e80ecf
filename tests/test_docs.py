"""README, .env.example, docker-compose.yml, Dockerfile, .ci/run and the code agree.

The variables the code reads are the rows of the settings table (relay/settings.py), so
a variable added to the code without its documentation (or documented but never read)
fails here.
"""

import re

import yaml
from conftest import PROJECT, RELAY_VARIABLES

from relay.settings import load_config, variables

README = (PROJECT / "README.md").read_text()
ENV_EXAMPLE = (PROJECT / ".env.example").read_text()
COMPOSE = yaml.safe_load((PROJECT / "docker-compose.yml").read_text())
DOCKERFILE = (PROJECT / "Dockerfile").read_text()
CI_RUN = (PROJECT / ".ci/run").read_text()


def code_variables() -> set[str]:
    """Every variable the relay reads: the rows of the settings table."""
    return variables()


def readme_variables() -> set[str]:
    section = README.split("## Configuration", 1)[1].split("\n## ", 1)[0]
    return set(re.findall(r"^\| `([A-Z_]+)` \|", section, re.MULTILINE))


def env_example_variables() -> set[str]:
    return set(re.findall(r"^#? ?([A-Z][A-Z_]+)=", ENV_EXAMPLE, re.MULTILINE))


def compose_relay_environment() -> dict:
    return COMPOSE["services"]["smtp-relay"]["environment"]


def test_code_reads_the_known_variables():
    assert code_variables() == set(RELAY_VARIABLES)


def test_readme_documents_every_variable():
    assert readme_variables() == code_variables()


def test_env_example_lists_every_variable():
    assert env_example_variables() == code_variables()


def test_compose_sets_every_variable():
    assert set(compose_relay_environment()) == code_variables()


def test_env_example_defaults_are_the_code_defaults():
    """Loading .env.example as it is gives the same config as no variables at all."""
    values = dict(re.findall(r"^([A-Z][A-Z_]+)=(.*)$", ENV_EXAMPLE, re.MULTILINE))
    assert load_config(values) == load_config({})


def test_compose_values_load_and_point_at_the_demo_upstream():
    environment = {k: str(v) for k, v in compose_relay_environment().items()}
    config = load_config(environment)
    assert config.relay_host == "demo-upstream"
    demo = COMPOSE["services"]["demo-upstream"]["command"]
    assert f"0.0.0.0:{config.relay_port}" in demo
    assert config.log_file.startswith("/var/log/smtp-relay/")
    assert any(v.endswith(":/var/log/smtp-relay")
               for v in COMPOSE["services"]["smtp-relay"]["volumes"])
    assert any(v.startswith("./certs:/etc/certs")
               for v in COMPOSE["services"]["smtp-relay"]["volumes"])


def test_dockerfile_runs_unprivileged_with_an_smtp_healthcheck():
    # A Python aiosmtpd 1.4.6 runs on: 3.14 removed typing.ByteString (aiosmtpd#549).
    version = re.search(r"^FROM python:3\.(\d+)-slim", DOCKERFILE, re.MULTILINE)
    assert version and 10 <= int(version.group(1)) <= 13
    # Unprivileged by default; started as root, the entrypoint drops to uid 1000.
    assert re.search(r"^USER (?!root\b|0\b)\w+", DOCKERFILE, re.MULTILINE)
    assert 'ENTRYPOINT ["docker-entrypoint.sh"]' in DOCKERFILE
    assert "COPY deploy/docker-entrypoint.sh /usr/local/bin/" in DOCKERFILE
    assert "exec setpriv --reuid=" in (PROJECT / "deploy/docker-entrypoint.sh").read_text()
    assert "HEALTHCHECK" in DOCKERFILE and "/healthz" in DOCKERFILE
    assert re.search(r"^ENV .*HTTP_PORT=8080", DOCKERFILE, re.MULTILINE | re.DOTALL)
    assert 'CMD ["python", "smtp_relay.py"]' in DOCKERFILE
    assert "LOG_FILE=/var/log/smtp-relay/" in DOCKERFILE


def test_ci_runs_the_readme_test_command():
    commands = re.findall(r"```sh\n(.*?)\n```", README, re.DOTALL)
    test_command = next(c for c in commands if "pytest" in c)
    assert test_command in CI_RUN.splitlines()
    assert "ruff check" in CI_RUN


def test_readme_quick_start_runs_the_demo():
    commands = re.findall(r"```sh\n(.*?)\n```", README, re.DOTALL)
    assert commands[0].endswith("python smtp_relay.py demo")


def readme_reply_table() -> str:
    return README.split("### What the client is told", 1)[1].split("\n\n", 2)[1]


def test_every_reply_the_relay_makes_is_a_row_of_the_readme_table():
    """relay/replies.py names one reply per row; a reply added there without its row
    (or a row whose reply is gone) fails here."""
    answers = [row.split("|")[3] for row in readme_reply_table().splitlines()[2:]]
    codes = {re.match(r"`(\d{3}(?: \d\.\d\.\d{1,3})?)`", answer.strip()).group(1)
             for answer in answers if answer.strip().startswith("`")}
    named = {f"{reply.code} {reply.status}".strip() for reply in all_replies()}
    # Replies that the README quotes but aiosmtpd or the upstream makes.
    not_ours = {"530", "250", "354"}
    assert codes - named - not_ours == set()
    refusals = {f"{reply.code} {reply.status}".strip() for reply in all_replies()
                if reply.code >= 400}
    assert refusals - codes == set()


def all_replies() -> list:
    from relay import replies
    return [value for value in vars(replies).values() if isinstance(value, replies.Reply)]
