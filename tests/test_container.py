"""The container and the systemd unit, for real.

- The README's Docker workflow (``docker-compose build``, ``up -d``, swaks, the host log,
  health, ``stop``) run by ../shared/container/compose-smoke.py on a fresh clone of the
  committed project, when a Docker engine can be started (``base-image.sh`` beside it
  starts one and makes the Dockerfile's base image, since no registry is reachable).
  Skipped otherwise, except under REQUIRE_DOCKER=1 (CI), where it fails instead.
- deploy/docker-entrypoint.sh run on this host: as root it hands the log directory to
  uid 1000 and runs the command as uid 1000 (real setpriv); as another user it runs the
  command as it is.
- deploy/smtp-relay.service: ``systemd-analyze verify`` and the directives the README
  promises (unprivileged user, EnvironmentFile, ProtectSystem=strict, restart).
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from conftest import PROJECT

SHARED = PROJECT.parent / "shared" / "container"
ENTRYPOINT = PROJECT / "deploy" / "docker-entrypoint.sh"
UNIT = PROJECT / "deploy" / "smtp-relay.service"
README = (PROJECT / "README.md").read_text()
RELAY_UID = 1000
# compose-smoke.py's checks: build, up, listens, 250, demo upstream, host log, healthy,
# unprivileged, /metrics, stop exit 0.
SMOKE_CHECKS = 10
# compose-smoke.py rewrites the compose file to host networking: these must be free.
SMOKE_PORTS = (1025, 2525, 8080)


def unavailable(reason: str) -> None:
    if os.environ.get("REQUIRE_DOCKER") == "1":
        pytest.fail(f"{reason} (REQUIRE_DOCKER=1: the container test must run)")
    pytest.skip(reason)


def run(command: list[str], timeout: float, cwd: Path | None = None,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                          check=False, cwd=cwd, env=env)


def port_in_use(port: int) -> bool:
    with socket.socket() as probe:
        probe.settimeout(2)
        return probe.connect_ex(("127.0.0.1", port)) == 0


def docker_engine() -> None:
    """A running engine with the Dockerfile's base image, or unavailable()."""
    if not (SHARED / "compose-smoke.py").exists():
        unavailable(f"no {SHARED}/compose-smoke.py beside the project")
    if shutil.which("dockerd") is None and shutil.which("docker") is None:
        unavailable("no Docker engine installed (bash ../shared/container/base-image.sh "
                    "installs and starts one)")
    if os.geteuid() == 0 and (SHARED / "base-image.sh").exists():
        # Starts dockerd if it is not running; makes the FROM stand-in once (about a minute).
        made = run(["bash", str(SHARED / "base-image.sh")], timeout=900, cwd=PROJECT)
        if made.returncode:
            unavailable("base-image.sh failed: " + (made.stdout + made.stderr)[-1500:])
    info = run(["docker", "info"], timeout=60)
    if info.returncode:
        unavailable("no Docker engine answers: " + info.stderr[-500:])
    for tool in ("docker-compose", "swaks", "curl"):
        if shutil.which(tool) is None:
            unavailable(f"compose-smoke.py needs {tool}")
    busy = [port for port in SMOKE_PORTS if port_in_use(port)]
    if busy:
        unavailable(f"127.0.0.1 ports {busy} are in use; compose-smoke.py needs them")


@pytest.mark.timeout(1800)
def test_readme_docker_workflow_on_a_fresh_clone() -> None:
    """compose-smoke.py clones the project as root (so ./logs belongs to root) and runs
    it with no manual step: the relay must start, deliver and log to ./logs."""
    docker_engine()
    uncommitted = run(["git", "status", "--porcelain", "--", "Dockerfile",
                       "docker-compose.yml", "deploy", "requirements.txt", "smtp_relay.py",
                       "relay"],
                      timeout=30, cwd=PROJECT).stdout
    smoke = run([sys.executable, str(SHARED / "compose-smoke.py"), "--project", str(PROJECT)],
                timeout=1500, cwd=PROJECT)
    output = smoke.stdout + smoke.stderr
    note = f"\n(uncommitted changes are not tested: the clone has HEAD)\n{uncommitted}" \
        if uncommitted else ""
    summary = re.search(r"^(\d+) passed, (\d+) failed$", smoke.stdout, re.MULTILINE)
    assert summary, output + note
    failed = [line for line in smoke.stdout.splitlines() if line.startswith("FAIL ")]
    assert not failed and summary.group(2) == "0", output + note
    assert int(summary.group(1)) >= SMOKE_CHECKS, output + note


def compose_seconds(value: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    return sum(float(n) * units[u] for n, u in re.findall(r"([\d.]+)(ms|s|m|h)", value))


def test_compose_prepares_the_log_dir_before_the_relay_starts() -> None:
    """The static side of the workflow above: a one-shot root service, run through the
    image's entrypoint, on the relay's own log mount, completed before the relay starts;
    the relay itself never root; stop waits for the TIMEOUT drain."""
    services = yaml.safe_load((PROJECT / "docker-compose.yml").read_text())["services"]
    relay, prepare = services["smtp-relay"], services["prepare-dirs"]
    assert prepare["user"] in ("0", "root", 0) and prepare["command"] == ["true"]
    assert "entrypoint" not in prepare and prepare["restart"] == "no"
    assert prepare["build"] == relay["build"]
    log_mount = next(v for v in relay["volumes"] if v.endswith(":/var/log/smtp-relay"))
    spool_mount = next(v for v in relay["volumes"] if v.endswith(":/var/spool/smtp-relay"))
    assert prepare["volumes"] == [log_mount, spool_mount]  # what the relay writes to
    assert prepare["environment"]["LOG_FILE"] == relay["environment"]["LOG_FILE"]
    assert relay["depends_on"]["prepare-dirs"] == {
        "condition": "service_completed_successfully"}
    assert str(relay.get("user", "1000")).split(":")[0] not in ("0", "root")
    assert compose_seconds(relay["stop_grace_period"]) > int(relay["environment"]["TIMEOUT"])


# --- deploy/docker-entrypoint.sh on this host -------------------------------------------

PROBE = textwrap.dedent("""\
    import os, sys
    status = dict(line.split(":", 1) for line in open("/proc/self/status"))
    print(*os.getresuid(), *os.getresgid(), len(os.getgroups()),
          status["NoNewPrivs"].strip(), int(status["CapEff"], 16))
    with open(os.environ["LOG_FILE"], "a") as log:
        log.write("written by the command\\n")
    sys.exit(int(os.environ.get("PROBE_EXIT", "0")))
""")


@pytest.fixture
def scratch() -> Iterator[Path]:
    """A directory every user can enter (tmp_path is root-only), with the entrypoint."""
    path = Path(tempfile.mkdtemp(prefix="entrypoint-"))
    path.chmod(0o755)
    shutil.copy2(ENTRYPOINT, path / "docker-entrypoint.sh")
    (path / "probe.py").write_text(PROBE)
    yield path
    shutil.rmtree(path, ignore_errors=True)


# The probe runs as uid 1000: a Python every user can execute (the venv's may live
# under a root-only home).
SYSTEM_PYTHON = "/usr/bin/python3"


def need_root_and_setpriv() -> None:
    if os.geteuid() != 0:
        pytest.skip("the entrypoint's root path needs root")
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) not installed")
    if not os.access(SYSTEM_PYTHON, os.X_OK):
        pytest.skip(f"no {SYSTEM_PYTHON} for the probe command")


def entrypoint(scratch: Path, log_file: Path, *prefix: str, **env: str
               ) -> subprocess.CompletedProcess:
    environment = {**os.environ, "LOG_FILE": str(log_file), **env}
    return run([*prefix, str(scratch / "docker-entrypoint.sh"), SYSTEM_PYTHON,
                str(scratch / "probe.py")], timeout=30, env=environment)


def owner(path: Path) -> int:
    return path.lstat().st_uid


def test_entrypoint_is_executable_and_posix_sh() -> None:
    assert ENTRYPOINT.stat().st_mode & stat.S_IXUSR
    assert ENTRYPOINT.read_text().startswith("#!/bin/sh\n")
    tracked = run(["git", "ls-files", "-s", "deploy/docker-entrypoint.sh"], timeout=30,
                  cwd=PROJECT).stdout
    assert tracked.startswith("100755 "), "the clone must get the executable bit"
    if shutil.which("dash"):
        assert run(["dash", "-n", str(ENTRYPOINT)], timeout=30).returncode == 0


def test_entrypoint_as_root_prepares_the_log_dir_then_drops_to_uid_1000(
        scratch: Path) -> None:
    """A ./logs made by root (a clone as root), with a log file and a rotation left by
    an earlier root run: all handed to uid 1000; other files there are not touched."""
    need_root_and_setpriv()
    logs = scratch / "logs"
    logs.mkdir(mode=0o755)
    log_file = logs / "smtp-relay.log"
    log_file.write_text("old line\n")
    (logs / "smtp-relay.log.1").write_text("older\n")
    (logs / "notes.txt").write_text("the owner's\n")
    assert owner(logs) == 0

    result = entrypoint(scratch, log_file, PROBE_EXIT="3")

    assert result.returncode == 3, result.stderr        # exec: the command's own status
    ruid, euid, suid, rgid, egid, sgid, groups, nnp, caps = map(int, result.stdout.split())
    assert (ruid, euid, suid) == (RELAY_UID,) * 3
    assert (rgid, egid, sgid) == (RELAY_UID,) * 3
    assert groups == 0 and caps == 0 and nnp == 1
    assert owner(logs) == RELAY_UID
    assert owner(log_file) == RELAY_UID and owner(logs / "smtp-relay.log.1") == RELAY_UID
    assert owner(logs / "notes.txt") == 0
    assert log_file.read_text() == "old line\nwritten by the command\n"


def test_entrypoint_as_root_creates_a_missing_log_dir(scratch: Path) -> None:
    need_root_and_setpriv()
    log_file = scratch / "new" / "logs" / "relay.log"
    result = entrypoint(scratch, log_file)
    assert result.returncode == 0, result.stderr
    assert owner(log_file.parent) == RELAY_UID and owner(log_file) == RELAY_UID


def test_entrypoint_as_root_does_not_follow_a_planted_symlink(scratch: Path) -> None:
    """A link named like a log file in the log directory: its target keeps its owner."""
    need_root_and_setpriv()
    logs = scratch / "logs"
    logs.mkdir(mode=0o755)
    target = scratch / "elsewhere"
    target.write_text("root's\n")
    (logs / "relay.log.9").symlink_to(target)
    result = entrypoint(scratch, logs / "relay.log")
    assert result.returncode == 0, result.stderr
    assert owner(target) == 0


@pytest.fixture
def top_level_dir() -> Iterator[Path]:
    """A fresh directory at the top level, like the image's /app, /tmp or /var."""
    path = Path(tempfile.mkdtemp(prefix="smtp-relay-entrypoint-", dir="/"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_entrypoint_as_root_leaves_system_directories_alone(scratch: Path,
                                                           top_level_dir: Path) -> None:
    """LOG_FILE=relay.log in the working directory (the image's /app, the code): the
    directory is not handed to the relay's user; only dedicated ones are."""
    need_root_and_setpriv()
    environment = {**os.environ, "LOG_FILE": "relay.log"}
    result = run([str(scratch / "docker-entrypoint.sh"), "true"], timeout=30,
                 env=environment, cwd=top_level_dir)
    assert result.returncode == 0, result.stderr
    assert owner(top_level_dir) == 0
    assert f"not giving {top_level_dir} to uid 1000" in result.stderr


def test_entrypoint_as_another_user_runs_the_command_as_it_is(scratch: Path) -> None:
    """compose's `user: "1234:1234"`: nothing to prepare, no privilege to drop."""
    need_root_and_setpriv()
    logs = scratch / "logs"
    logs.mkdir(mode=0o755)
    os.chown(logs, 1234, 1234)
    as_1234 = ("setpriv", "--reuid=1234", "--regid=1234", "--clear-groups")
    result = entrypoint(scratch, logs / "smtp-relay.log", *as_1234)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[:6] == ["1234"] * 6
    assert result.stderr == ""
    assert owner(logs / "smtp-relay.log") == 1234


def test_entrypoint_unprivileged_says_why_an_unwritable_log_dir_fails(scratch: Path) -> None:
    """The image's default user on a root-owned ./logs without prepare-dirs: a hint on
    stderr, and the command still runs (the relay itself then refuses LOG_FILE)."""
    need_root_and_setpriv()
    logs = scratch / "logs"
    logs.mkdir(mode=0o755)
    as_relay = ("setpriv", f"--reuid={RELAY_UID}", f"--regid={RELAY_UID}", "--clear-groups")
    result = entrypoint(scratch, logs / "smtp-relay.log", *as_relay)
    assert result.returncode != 0                      # the probe cannot open the log
    assert "not writable by uid 1000" in result.stderr
    assert "start the container once as root" in result.stderr
    assert owner(logs) == 0


# --- deploy/smtp-relay.service ------------------------------------------------------------

def unit_directives() -> dict[str, list[str]]:
    directives: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.startswith(("#", ";", "[")):
            key, value = line.split("=", 1)
            directives.setdefault(key.strip(), []).append(value.strip())
    return directives


def test_unit_runs_unprivileged_with_only_log_and_spool_writable() -> None:
    unit = unit_directives()
    assert unit["User"] not in (["root"], ["0"]) and len(unit["User"]) == 1
    assert unit["EnvironmentFile"] == ["/etc/smtp-relay/env"]
    assert unit["ProtectSystem"] == ["strict"]
    assert unit["LogsDirectory"] == ["smtp-relay"]              # /var/log/smtp-relay
    assert unit["ReadWritePaths"] == ["-/var/spool/smtp-relay"]
    assert not {"StateDirectory", "CacheDirectory", "RuntimeDirectory",
                "ReadWriteDirectories"} & set(unit)
    assert unit["ProtectHome"] == ["yes"] and unit["PrivateTmp"] == ["yes"]
    assert unit["NoNewPrivileges"] == ["yes"]
    assert unit["Restart"] == ["on-failure"]
    assert "LOG_FILE=/var/log/smtp-relay/smtp-relay.log" in unit["Environment"][0].split()
    assert unit["ExecStart"][0].endswith(" /opt/smtp-relay/smtp_relay.py")
    assert int(unit["TimeoutStopSec"][0]) > 60                  # the TIMEOUT drain
    assert unit["WantedBy"] == ["multi-user.target"]


def relocated_unit(prefix: Path) -> Path:
    """The unit with /opt/smtp-relay moved to prefix, where a python exists, since verify
    insists that ExecStart is executable; every other line as shipped."""
    (prefix / ".venv" / "bin").mkdir(parents=True)
    (prefix / ".venv" / "bin" / "python").symlink_to(sys.executable)
    (prefix / "smtp_relay.py").symlink_to(PROJECT / "smtp_relay.py")
    unit = prefix / "smtp-relay.service"
    unit.write_text(UNIT.read_text().replace("/opt/smtp-relay", str(prefix)))
    return unit


def systemd_analyze() -> str:
    path = shutil.which("systemd-analyze")
    if path is None:
        pytest.skip("systemd-analyze not installed (the unit's directives are checked "
                    "statically above)")
    return path


def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    """No warning at all: verify exits 0 even on unknown keys, so its output must be empty."""
    result = run([systemd_analyze(), "verify", "--man=no", str(relocated_unit(tmp_path))],
                 timeout=60)
    assert result.returncode == 0 and result.stdout + result.stderr == "", \
        result.stdout + result.stderr


def test_unit_sandboxing_exposure_is_low(tmp_path: Path) -> None:
    result = run([systemd_analyze(), "security", "--offline=yes", "--no-pager",
                  str(relocated_unit(tmp_path))], timeout=60)
    score = re.search(r"Overall exposure level for \S+: ([\d.]+)", result.stdout)
    if score is None and "--offline" in result.stderr:
        pytest.skip("systemd-analyze security --offline needs systemd 250+")
    assert score, result.stdout + result.stderr
    assert float(score.group(1)) <= 2.0, result.stdout


def test_readme_install_steps_put_the_log_where_the_unit_may_write(tmp_path: Path) -> None:
    """.env.example's LOG_FILE is relative (logs/ under the read-only /opt/smtp-relay):
    the README's sed line must move it to the unit's LogsDirectory, or the service
    exits 2 at start (found running the steps under systemd)."""
    section = README.split("## Running under systemd", 1)[1].split("\n## ", 1)[0]
    step = next(line for line in section.splitlines() if line.startswith("sed -i "))
    env_file = tmp_path / "env"
    shutil.copy(PROJECT / ".env.example", env_file)
    done = run(["bash", "-c", step.replace("/etc/smtp-relay/env", str(env_file))],
               timeout=30)
    assert done.returncode == 0, done.stderr
    log_files = re.findall(r"^LOG_FILE=(.*)$", env_file.read_text(), re.MULTILINE)
    logs_directory = unit_directives()["LogsDirectory"][0]
    assert log_files == [f"/var/log/{logs_directory}/smtp-relay.log"]


def test_readme_documents_the_unit_and_the_entrypoint() -> None:
    section = README.split("## Running under systemd", 1)[1].split("\n## ", 1)[0]
    for step in ("useradd", "deploy/smtp-relay.service", "/etc/smtp-relay/env",
                 "systemctl enable --now smtp-relay", "/opt/smtp-relay",
                 "/var/log/smtp-relay"):
        assert step in section, step
    docker = README.split("## Docker", 1)[1].split("\n## ", 1)[0]
    assert "chown 1000" not in docker                 # no manual step any more
    assert "entrypoint" in docker and "setpriv" in docker and "prepare-dirs" in docker
