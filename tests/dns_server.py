"""A small authoritative DNS server for the tests, on dnspython (already a dependency
of the relay): UDP on a loopback port, in a thread of the test process.

Records are added per test (`add`); a name with no records at all answers NXDOMAIN, a
name with records of other types an empty NOERROR (NoAnswer), and names in `servfail`
answer SERVFAIL, as a broken authoritative server does.
"""

from __future__ import annotations

import socket
import threading

import dns.exception
import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset


class DNSServer:
    def __init__(self, host: str = "127.0.0.1") -> None:
        self.records: dict[tuple[str, str], list[str]] = {}
        self.servfail: set[str] = set()
        self.queries: list[tuple[str, str]] = []
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((host, 0))
        self.sock.settimeout(0.2)
        self.host, self.port = self.sock.getsockname()[:2]
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="test-dns", daemon=True)
        self._thread.start()

    @property
    def address(self) -> str:
        """As DNS_RESOLVERS takes it."""
        return f"{self.host}:{self.port}"

    def add(self, name: str, rdtype: str, *values: str) -> None:
        self.records.setdefault((name.lower().rstrip("."), rdtype.upper()), []).extend(
            values)

    def clear(self) -> None:
        self.records.clear()
        self.servfail.clear()
        self.queries.clear()

    def _answer(self, query: dns.message.Message) -> dns.message.Message:
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        question = query.question[0]
        name = question.name.to_text().rstrip(".").lower()
        rdtype = dns.rdatatype.to_text(question.rdtype)
        self.queries.append((name, rdtype))
        if name in self.servfail:
            response.set_rcode(dns.rcode.SERVFAIL)
        elif not any(known == name for known, _ in self.records):
            response.set_rcode(dns.rcode.NXDOMAIN)
        else:
            values = self.records.get((name, rdtype), [])
            if values:
                response.answer.append(dns.rrset.from_text_list(
                    question.name, 60, "IN", rdtype, values))
        return response

    def _serve(self) -> None:
        while not self._stopping.is_set():
            try:
                data, peer = self.sock.recvfrom(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                response = self._answer(dns.message.from_wire(data))
            except (dns.exception.DNSException, IndexError):
                continue  # a malformed query: no answer, as servers do
            self.sock.sendto(response.to_wire(), peer)

    def close(self) -> None:
        self._stopping.set()
        self._thread.join(5)
        self.sock.close()
