"""Ask an agent's DNS server questions: with `dig` (what operators use) and with raw packets.

`dig()` runs `dig @127.0.0.1 -p <port>` and parses its full output into a `DigAnswer`; the raw
helpers build queries byte by byte, for malformed packets dig cannot send.
"""

import re
import shutil
import socket
import struct
import subprocess
from dataclasses import dataclass, field

import pytest

DIG_TIMEOUT_SECONDS = 10


@dataclass
class DigAnswer:
    """What dig printed, parsed: status, header flags, each section's records and the size."""

    status: str
    id: int
    flags: set
    answer: list = field(default_factory=list)
    authority: list = field(default_factory=list)
    additional: list = field(default_factory=list)
    question: list = field(default_factory=list)
    size: int = None
    output: str = ""

    def records(self, section="answer", rtype=None) -> list:
        """Records of one section as (name, ttl, type, data) tuples, optionally of one type."""
        return [record for record in getattr(self, section) if rtype is None or record[2] == rtype]

    def data(self, rtype, section="answer") -> list:
        """The data of the section's records of `rtype`, sorted."""
        return sorted(record[3] for record in self.records(section, rtype))


def dig_binary() -> str:
    found = shutil.which("dig")
    if not found:
        pytest.fail("dig not found: install dnsutils (scripts/test.sh does)", pytrace=False)
    return found


def dig_command(port: int, name: str, rtype: str = "A", *options) -> list:
    return [dig_binary(), "@127.0.0.1", "-p", str(port), "+tries=1", "+time=2", *options, name, rtype]


def dig(port: int, name: str, rtype: str = "A", *options) -> DigAnswer:
    """`dig @127.0.0.1 -p <port> <options> <name> <rtype>`, parsed; fails the test if dig fails."""
    command = dig_command(port, name, rtype, *options)
    completed = subprocess.run(command, capture_output=True, text=True, timeout=DIG_TIMEOUT_SECONDS)
    output = completed.stdout
    assert completed.returncode == 0, f"{' '.join(command)} exited {completed.returncode}:\n{output}{completed.stderr}"
    return parse_dig(output, command)


def dig_short(port: int, name: str, rtype: str = "A", *options) -> list:
    """`dig +short`: the answer data lines, sorted."""
    command = dig_command(port, name, rtype, "+short", *options)
    completed = subprocess.run(command, capture_output=True, text=True, timeout=DIG_TIMEOUT_SECONDS)
    assert completed.returncode == 0, f"{' '.join(command)} exited {completed.returncode}:\n{completed.stdout}{completed.stderr}"
    return sorted(line.strip() for line in completed.stdout.splitlines() if line.strip() and not line.startswith(";"))


HEADER = re.compile(r";; ->>HEADER<<- opcode: (\S+), status: (\S+), id: (\d+)")
FLAGS = re.compile(r";; flags:([^;]*);")
SIZE = re.compile(r";; MSG SIZE\s+rcvd: (\d+)")
SECTIONS = {
    ";; QUESTION SECTION:": "question",
    ";; ANSWER SECTION:": "answer",
    ";; AUTHORITY SECTION:": "authority",
    ";; ADDITIONAL SECTION:": "additional",
}


def parse_dig(output: str, command=()) -> DigAnswer:
    header = HEADER.search(output)
    flags = FLAGS.search(output)
    assert header and flags, f"no answer from {' '.join(command)}:\n{output}"
    size = SIZE.search(output)
    parsed = DigAnswer(
        status=header.group(2).rstrip(","),
        id=int(header.group(3)),
        flags=set(flags.group(1).split()),
        size=int(size.group(1)) if size else None,
        output=output,
    )
    section = None
    for line in output.splitlines():
        if line in SECTIONS:
            section = SECTIONS[line]
            continue
        if not line.strip() or (line.startswith(";;") and section != "question"):
            section = None
            continue
        if section == "question":
            parts = line.lstrip(";").split()
            getattr(parsed, section).append((parts[0], None, parts[-1], None))
        elif section:
            parts = line.split(None, 4)
            name, ttl, _, rtype, data = parts
            getattr(parsed, section).append((name, int(ttl), rtype, data))
    return parsed


# --- raw packets -------------------------------------------------------------------------------

TYPES = {"A": 1, "NS": 2, "CNAME": 5, "SOA": 6, "PTR": 12, "MX": 15, "TXT": 16, "AAAA": 28, "SRV": 33, "ANY": 255}


def encode_name(name: str) -> bytes:
    out = b""
    for label in name.strip(".").split("."):
        raw = label.encode()
        out += bytes([len(raw)]) + raw
    return out + b"\0"


def header(query_id: int, flags: int = 0x0100, qd: int = 1, an: int = 0, ns: int = 0, ar: int = 0) -> bytes:
    return struct.pack("!HHHHHH", query_id, flags, qd, an, ns, ar)


def query_packet(query_id: int, name: str, rtype: str = "A", flags: int = 0x0100) -> bytes:
    """A plain query, recursion desired, no EDNS."""
    return header(query_id, flags) + encode_name(name) + struct.pack("!HH", TYPES[rtype], 1)


def parse_header(packet: bytes) -> dict:
    query_id, flags, qd, an, ns, ar = struct.unpack("!HHHHHH", packet[:12])
    return {
        "id": query_id, "qr": bool(flags & 0x8000), "opcode": (flags >> 11) & 0xF, "tc": bool(flags & 0x0200),
        "rcode": flags & 0xF, "qd": qd, "an": an, "ns": ns, "ar": ar,
    }


def udp_exchange(port: int, packet: bytes, timeout: float = 2.0):
    """Send one datagram; the reply, or None when none came within `timeout`."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        sock.sendto(packet, ("127.0.0.1", port))
        try:
            return sock.recv(65535)
        except socket.timeout:
            return None


def tcp_exchange(port: int, packet: bytes, timeout: float = 2.0) -> bytes:
    """Send one length-prefixed message over TCP and read one length-prefixed reply."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(struct.pack("!H", len(packet)) + packet)
        length = struct.unpack("!H", recv_exactly(sock, 2))[0]
        return recv_exactly(sock, length)


def recv_exactly(sock, count: int) -> bytes:
    data = b""
    while len(data) < count:
        chunk = sock.recv(count - len(data))
        if not chunk:
            raise ConnectionError(f"connection closed after {len(data)} of {count} bytes")
        data += chunk
    return data
