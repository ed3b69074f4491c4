"""The DNS server against hostile input: 2,000 random, truncated and mutated datagrams (seeded, so a
failure replays) and a few hundred TCP connections with bogus length prefixes. Afterwards the agent
must still answer a normal `dig` within a second and /ping. Also: a malformed query with a valid
header gets FORMERR with its id, and responses (QR set) are never answered.

Everything is bounded: packet counts are fixed, every socket has a timeout, and the whole file
runs in a few seconds.
"""

import random
import select
import socket
import struct
import time

import pytest

from support.dns import dig, encode_name, header, parse_header, query_packet, udp_exchange

SEED = 20_26_11_22
UDP_PACKETS = 2000
TCP_CONNECTIONS = 300
FUZZ_TIME_LIMIT_SECONDS = 60
DOMAIN = "flotilla"
NODE = "test-node"
CHECK_SERVICE = "fuzz-check"
CHECK_ADDRESS = "127.0.0.5"


def question(name: str, rtype: int = 1) -> bytes:
    return encode_name(name) + struct.pack("!HH", rtype, 1)


def valid_query(rng: random.Random) -> bytes:
    name = rng.choice([
        f"{CHECK_SERVICE}.service.{DOMAIN}", f"{NODE}.node.{DOMAIN}", f"_{CHECK_SERVICE}._tcp.service.dc1.{DOMAIN}",
        f"x.{DOMAIN}", "example.com", f"{DOMAIN}", f"a.b.c.d.service.{DOMAIN}",
    ])
    rtype = rng.choice([1, 28, 33, 255, 6, 16, 0, 65535])
    return header(rng.randrange(65536)) + question(name, rtype)


def pointer_loop(rng: random.Random) -> bytes:
    choice = rng.randrange(4)
    if choice == 0:  # a name that points at itself
        body = b"\xc0\x0c"
    elif choice == 1:  # two pointers pointing at each other
        body = b"\xc0\x0e\xc0\x0c"
    elif choice == 2:  # a label, then a pointer back to the start of the name
        body = b"\x03abc\xc0\x0c"
    else:  # a pointer past the end of the packet
        body = b"\xc0" + bytes([rng.randrange(20, 256)])
    return header(rng.randrange(65536)) + body + b"\x00\x01\x00\x01"


def label_past_end(rng: random.Random) -> bytes:
    length = rng.randrange(2, 64)
    return header(rng.randrange(65536)) + bytes([length]) + b"x" * rng.randrange(0, length)


def oversized_label(rng: random.Random) -> bytes:
    size = rng.choice([64, 65, 127, 128, 191])
    return header(rng.randrange(65536)) + bytes([size]) + b"a" * min(size, 63 + rng.randrange(2)) + b"\x00\x00\x01\x00\x01"


def too_long_name(rng: random.Random) -> bytes:
    labels = b"".join(b"\x3f" + b"b" * 63 for _ in range(rng.randrange(4, 8)))
    return header(rng.randrange(65536)) + labels + b"\x00\x00\x01\x00\x01"


def huge_counts(rng: random.Random) -> bytes:
    counts = [rng.choice([0, 1, 2, 9, 64, 65, 255, 4096, 65535]) for _ in range(4)]
    tail = bytes(rng.randrange(256) for _ in range(rng.randrange(0, 64)))
    return header(rng.randrange(65536), rng.randrange(65536) & ~0x8000, *counts) + tail


def with_records(rng: random.Random) -> bytes:
    """A question plus answer / additional records with odd lengths (OPT with extreme sizes)."""
    query = header(rng.randrange(65536), 0x0100, 1, rng.randrange(3), 0, rng.randrange(1, 4))
    query += question(f"{NODE}.node.{DOMAIN}")
    for _ in range(rng.randrange(1, 5)):
        rtype = rng.choice([41, 1, 33])
        rclass = rng.choice([0, 1, 511, 512, 4096, 65535])
        rdlength = rng.choice([0, 4, 100, 65535])
        query += b"\x00" + struct.pack("!HHIH", rtype, rclass, 0, rdlength) + b"\x00" * rng.randrange(0, 8)
    return query


def qr_set(rng: random.Random) -> bytes:
    packet = bytearray(valid_query(rng))
    packet[2] |= 0x80
    return bytes(packet)


def odd_opcode(rng: random.Random) -> bytes:
    packet = bytearray(valid_query(rng))
    packet[2] = (packet[2] & 0x87) | (rng.randrange(1, 16) << 3)
    return bytes(packet)


def mutated(rng: random.Random) -> bytes:
    packet = bytearray(valid_query(rng))
    for _ in range(rng.randrange(1, 6)):
        action = rng.randrange(3)
        if action == 0 and packet:
            packet[rng.randrange(len(packet))] = rng.randrange(256)
        elif action == 1:
            packet.insert(rng.randrange(len(packet) + 1), rng.randrange(256))
        elif packet:
            del packet[rng.randrange(len(packet))]
    return bytes(packet)


def truncated(rng: random.Random) -> bytes:
    packet = valid_query(rng)
    return packet[: rng.randrange(len(packet))]


def random_bytes(rng: random.Random) -> bytes:
    return bytes(rng.randrange(256) for _ in range(rng.choice([12, 13, 20, 64, 300, 512, 1500, 4000])))


GENERATORS = [
    lambda rng: b"",
    lambda rng: bytes(rng.randrange(256) for _ in range(rng.randrange(1, 12))),
    huge_counts, pointer_loop, label_past_end, oversized_label, too_long_name, with_records, qr_set, odd_opcode,
    mutated, truncated, random_bytes, valid_query,
]


def fuzz_packets(seed: int, count: int) -> list:
    rng = random.Random(seed)
    packets = [b"", *(bytes(rng.randrange(256) for _ in range(size)) for size in range(1, 12))]
    while len(packets) < count:
        packets.append(rng.choice(GENERATORS)(rng))
    return packets


def drain(sock, replies: list, wait: float) -> None:
    deadline = time.monotonic() + wait
    while True:
        left = deadline - time.monotonic()
        ready, _, _ = select.select([sock], [], [], max(0.0, left))
        if not ready:
            return
        replies.append(sock.recv(65535))


@pytest.fixture(scope="module")
def dns_agent(shared_agent):
    """The shared agent with one passing external service, to check answers after the fuzzing."""
    body = {
        "Name": CHECK_SERVICE, "ID": CHECK_SERVICE, "Address": CHECK_ADDRESS, "Port": 53,
        "Check": {"TTL": "600s", "Status": "passing"},
    }
    response = shared_agent.put("/v1/agent/service/register", json=body)
    assert response.status_code == 200, response.text
    return shared_agent


def assert_agent_answers(agent) -> None:
    started = time.monotonic()
    answer = dig(agent.dns_port, f"{CHECK_SERVICE}.service.{DOMAIN}", "A", "+time=1")
    elapsed = time.monotonic() - started
    assert answer.status == "NOERROR", answer.output
    assert answer.data("A") == [CHECK_ADDRESS], answer.output
    assert elapsed < 1.0, f"dig took {elapsed:.2f} s after the fuzzing"
    node = dig(agent.dns_port, f"{NODE}.node.{DOMAIN}", "A", "+tcp", "+time=1")
    assert node.data("A") == ["127.0.0.1"], node.output
    assert agent.is_running(), "the agent exited"
    ping = agent.get("/ping", timeout=2)
    assert ping.status_code == 200 and ping.text.strip() == "pong"


def test_udp_fuzz(dns_agent):
    assert_agent_answers(dns_agent)
    packets = fuzz_packets(SEED, UDP_PACKETS)
    replies = []
    started = time.monotonic()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for index, packet in enumerate(packets):
            sock.sendto(packet, ("127.0.0.1", dns_agent.dns_port))
            if index % 50 == 49:
                drain(sock, replies, 0.02)
        drain(sock, replies, 0.5)
    assert time.monotonic() - started < FUZZ_TIME_LIMIT_SECONDS
    assert dns_agent.is_running(), f"the agent died during the UDP fuzzing (seed {SEED})"
    assert replies, "the valid queries among the packets should have been answered"
    for reply in replies:
        assert len(reply) >= 12, f"a reply shorter than a header: {reply!r}"
        assert parse_header(reply)["qr"], f"a reply without QR: {reply[:64]!r}"
    assert_agent_answers(dns_agent)


def tcp_attempt(port: int, payload: bytes, half_close: bool = True) -> bytes:
    """Connect and send `payload`. Half-closed: read until the server closes (at most 2 s);
    otherwise read for a moment and close the connection from this side."""
    received = b""
    with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
        sock.sendall(payload)
        if half_close:
            sock.shutdown(socket.SHUT_WR)
        else:
            sock.settimeout(0.05)
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline:
            try:
                chunk = sock.recv(65535)
            except (socket.timeout, ConnectionResetError):
                break
            if not chunk:
                break
            received += chunk
    return received


def test_tcp_fuzz(dns_agent):
    rng = random.Random(SEED + 1)
    port = dns_agent.dns_port
    started = time.monotonic()
    # Idle connections that never send anything must not keep others from being answered.
    idle = [socket.create_connection(("127.0.0.1", port), timeout=2) for _ in range(20)]
    try:
        for attempt in range(TCP_CONNECTIONS):
            kind = attempt % 6
            if kind == 0:
                payload = b"\x00\x00"  # a zero-length message
            elif kind == 1:
                payload = b"\x00\x01" + bytes([rng.randrange(256)])
            elif kind == 2:
                payload = b"\xff\xff" + bytes(rng.randrange(256) for _ in range(rng.randrange(0, 200)))
            elif kind == 3:
                payload = bytes([rng.randrange(256)])  # half a length prefix
            elif kind == 4:
                body = fuzz_packets(SEED + attempt, 40)[-1]
                payload = struct.pack("!H", len(body)) + body
            else:
                body = query_packet(attempt, f"{CHECK_SERVICE}.service.{DOMAIN}")
                payload = struct.pack("!H", len(body)) + body + b"\x00\x05junk"  # a good message, then a short one
            received = tcp_attempt(port, payload, half_close=kind == 5 or attempt % 7 != 0)
            if kind == 5:
                assert len(received) >= 14, f"the valid query on connection {attempt} was not answered: {received!r}"
                length = struct.unpack("!H", received[:2])[0]
                reply = parse_header(received[2 : 2 + length])
                assert (reply["id"], reply["rcode"], reply["an"]) == (attempt, 0, 1), reply
            assert time.monotonic() - started < FUZZ_TIME_LIMIT_SECONDS, f"TCP fuzzing too slow at connection {attempt}"
        assert_agent_answers(dns_agent)
    finally:
        for sock in idle:
            sock.close()
    assert_agent_answers(dns_agent)


@pytest.mark.parametrize(
    "body",
    [
        b"\x05abc",  # a label running past the end
        b"\x03abc\x00\x00\x01",  # a question cut in its type / class
        b"\xc0\x0c\x00\x01\x00\x01",  # a compression pointer loop
        b"\x40" + b"a" * 64 + b"\x00\x00\x01\x00\x01",  # a 64-byte label
    ],
    ids=["label-past-end", "short-question", "pointer-loop", "64-byte-label"],
)
def test_malformed_query_gets_formerr_with_its_id(dns_agent, body):
    packet = header(0x1234) + body
    reply = udp_exchange(dns_agent.dns_port, packet)
    assert reply is not None, f"no answer to {packet!r}: expected FORMERR"
    fields = parse_header(reply)
    assert fields["id"] == 0x1234
    assert fields["qr"] is True
    assert fields["rcode"] == 1, f"expected FORMERR (1), got rcode {fields['rcode']}"


def test_huge_question_count_gets_formerr(dns_agent):
    reply = udp_exchange(dns_agent.dns_port, header(0x4321, 0x0100, 65535) + question(f"{NODE}.node.{DOMAIN}"))
    assert reply is not None
    assert (parse_header(reply)["id"], parse_header(reply)["rcode"]) == (0x4321, 1)


def test_responses_are_never_answered(dns_agent):
    """A packet with QR set is a response: answering it would let two servers loop."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for query_id in range(10):
            packet = bytearray(query_packet(query_id, f"{NODE}.node.{DOMAIN}"))
            packet[2] |= 0x80
            sock.sendto(bytes(packet), ("127.0.0.1", dns_agent.dns_port))
            sock.sendto(bytes(packet[:14]), ("127.0.0.1", dns_agent.dns_port))  # malformed too
        replies = []
        drain(sock, replies, 0.5)
    assert replies == [], f"responses were answered: {replies[:3]!r}"


def test_other_opcodes_get_notimp(dns_agent):
    packet = bytearray(query_packet(0x2222, f"{NODE}.node.{DOMAIN}"))
    packet[2] |= 2 << 3  # STATUS
    reply = udp_exchange(dns_agent.dns_port, bytes(packet))
    assert reply is not None
    fields = parse_header(reply)
    assert (fields["id"], fields["qr"], fields["opcode"], fields["rcode"]) == (0x2222, True, 2, 4)


def test_the_question_is_echoed_byte_for_byte(dns_agent):
    """DNS names are bytes: the question comes back exactly as sent (here with non-UTF-8 bytes),
    or resolvers that match answers to questions drop the answer."""
    asked = b"\x02\xff\xfe" + encode_name(f"{NODE}.node.{DOMAIN}") + b"\x00\x01\x00\x01"
    reply = udp_exchange(dns_agent.dns_port, header(0x3333) + asked)
    assert reply is not None
    assert parse_header(reply)["id"] == 0x3333
    assert reply[12 : 12 + len(asked)] == asked, f"question sent {asked!r}, echoed {reply[12:12 + len(asked) + 8]!r}"
