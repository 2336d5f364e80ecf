"""The delivery process (relay/worker.py): in queue and fallback mode the deliveries run
in a child of the relay. Its log lines land in LOG_FILE (written by the parent), its
metric updates in the parent's /metrics; a child that dies is started again and what it
held is delivered later; a parent that dies takes its child with it."""

from __future__ import annotations

import os
import signal
import time
import urllib.request

import pytest
from conftest import free_port
from test_queue import QUEUED, send, subjects, wait_until

pytestmark = pytest.mark.timeout(90)


def children(pid: int) -> list[int]:
    """The delivery processes of relay `pid` (its children running relay.worker)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                parent = int(stat.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as cmdline:
                command = cmdline.read().split(b"\0")
        except (OSError, ValueError, IndexError):
            continue
        if parent == pid and any(b"relay.worker" in part for part in command):
            found.append(int(entry))
    return found


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def metrics(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
        return answer.read().decode()


@pytest.mark.parametrize("mode", ["queue", "fallback"])
def test_deliveries_run_in_a_child_whose_lines_and_metrics_reach_the_parent(
        start, upstream, mode):
    port = free_port()
    if mode == "fallback":  # the synchronous try is deferred: the queue's is not
        upstream.handler.mail_reply = "451 4.3.0 Try later"
    relay = start(upstream, DELIVERY_MODE=mode, HTTP_PORT=str(port),
                  HTTP_HOST="127.0.0.1", QUEUE_RETRY_MIN="0.2", QUEUE_RETRY_MAX="0.4")
    assert len(children(relay.process.pid)) == 1
    reply = send(relay, "from the child")
    upstream.handler.mail_reply = None
    queue_id = QUEUED.match(reply).group(1)
    relay.wait_for_log(f"delivered id={queue_id}")
    assert subjects(upstream) == ["from the child"]
    wait_until(lambda: 'smtp_relay_queue_attempts_total{result="delivered"} 1.0'
               in metrics(port), what="the child's attempt in /metrics")
    assert "smtp_relay_upstream_up 1.0" in metrics(port)


def test_a_delivery_process_that_dies_is_replaced_and_its_message_delivered(
        start, upstream):
    upstream.handler.stall["DATA"] = 3.0  # the child is mid-delivery when it dies
    relay = start(upstream, DELIVERY_MODE="queue", QUEUE_RETRY_MIN="0.3", QUEUE_RETRY_MAX="0.6")
    [child] = children(relay.process.pid)
    queue_id = QUEUED.match(send(relay, "survives its deliverer")).group(1)
    wait_until(lambda: upstream.handler.sessions, what="the delivery to begin")
    os.kill(child, signal.SIGKILL)
    relay.wait_for_log("delivery-process-died")
    upstream.handler.stall.pop("DATA")
    wait_until(lambda: len(children(relay.process.pid)) == 1
               and children(relay.process.pid) != [child], what="a new delivery process")
    # Deferred as after a lost link, and tried again by the new child.
    relay.wait_for_log(f"delivered id={queue_id}", timeout=30)
    assert "survives its deliverer" in subjects(upstream)
    assert relay.process.poll() is None


def test_the_delivery_process_ignores_sigint_to_the_group_and_leaves_with_its_parent(
        start, upstream):
    relay = start(upstream, DELIVERY_MODE="queue")
    [child] = children(relay.process.pid)
    relay.wait_for_log(f"delivered id={QUEUED.match(send(relay, 'one')).group(1)}")
    os.kill(child, signal.SIGINT)  # as a terminal's Ctrl-C reaches the whole group
    os.kill(child, signal.SIGTERM)  # and a service manager's stop
    time.sleep(0.5)
    assert alive(child)
    queue_id = QUEUED.match(send(relay, "still delivered")).group(1)
    relay.wait_for_log(f"delivered id={queue_id}")
    relay.process.send_signal(signal.SIGKILL)
    relay.process.wait()
    wait_until(lambda: not alive(child), what="the orphaned child to leave")


def test_the_delivery_process_yields_the_cpu_to_the_acceptor(start, upstream):
    relay = start(upstream, DELIVERY_MODE="queue")
    [child] = children(relay.process.pid)

    def niceness(pid: int) -> int:
        with open(f"/proc/{pid}/stat") as stat:
            return int(stat.read().rsplit(")", 1)[1].split()[16])

    # (its first statements, a moment after it is started)
    wait_until(lambda: niceness(child) == niceness(relay.process.pid) + 10,
               what="the delivery process's lower priority")


def test_sync_mode_has_no_delivery_process(start, upstream):
    relay = start(upstream, ARCHIVE="metadata")
    time.sleep(0.3)
    assert children(relay.process.pid) == []
