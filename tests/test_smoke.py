"""The happy path end to end: a client, the relay process, a real upstream."""

from conftest import message


def test_message_is_delivered_with_upstream_reply(relay, upstream):
    with relay.client() as client:
        refused = client.sendmail("app@example.com", ["ops@example.com"], message())
        code, _ = client.noop()
    assert refused == {}
    assert code == 250
    assert len(upstream.messages) == 1
    received = upstream.messages[0]
    assert received.mail_from == "app@example.com"
    assert received.rcpt_tos == ["ops@example.com"]
    assert received.content.endswith(message())
    assert received.content.startswith(b"Received: from client.test ([127.0.0.1])")
