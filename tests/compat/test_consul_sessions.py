"""Consul sessions, locks and transactions, driven by the real `consul` client (py-consul) and a
leader-election program built on it (tests/support/consul_leader.py)."""

import base64
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import consul
import consul.exceptions
import pytest
import requests

from support.flotilla import wait_until

LEADER_PROGRAM = Path(__file__).resolve().parent.parent / "support" / "consul_leader.py"


@pytest.fixture(scope="module")
def consul_api(agent):
    return consul.Consul(host="127.0.0.1", port=agent.api_port)


def key(prefix="lock"):
    return f"sessions-test/{prefix}-{uuid.uuid4().hex[:8]}"


def test_session_lifecycle(consul_api, agent):
    session = consul_api.session.create(name="web-lock", ttl=20, lock_delay=5, behavior="delete")
    index, info = consul_api.session.info(session)
    assert info["ID"] == session and info["Name"] == "web-lock"
    assert info["TTL"] == "20s" and info["Behavior"] == "delete"
    assert info["LockDelay"] == 5_000_000_000, "LockDelay is in nanoseconds, as Consul reports it"
    assert info["Node"] == "test-node" and info["NodeChecks"] == ["serfHealth"]
    assert int(index) >= 1
    assert session in {entry["ID"] for entry in consul_api.session.list()[1]}
    assert session in {entry["ID"] for entry in consul_api.session.node("test-node")[1]}
    assert consul_api.session.renew(session)["ID"] == session

    assert consul_api.session.destroy(session) is True
    assert consul_api.session.info(session)[1] is None, "an unknown session's info is []"
    with pytest.raises(consul.NotFound):
        consul_api.session.renew(session)
    assert consul_api.session.destroy(session) is True, "destroying twice is fine, as in Consul"


def test_session_errors_speak_consuls_words(agent):
    reply = agent.put("/v1/session/create", json={"TTL": "5s"})
    assert reply.status_code == 500 and reply.text.startswith("Invalid Session TTL '5000000000'"), reply.text
    reply = agent.put("/v1/session/create", json={"Behavior": "explode"})
    assert reply.status_code == 500 and "Invalid Behavior" in reply.text
    reply = agent.put("/v1/session/create", json={"Node": "no-such-node"})
    assert reply.status_code == 500 and "Missing node registration" in reply.text
    reply = agent.put("/v1/session/create", json={"NodeChecks": ["no-such-check"]})
    assert reply.status_code == 500 and "Missing check 'no-such-check' registration" in reply.text
    reply = agent.put("/v1/kv/sessions-test/x", params={"acquire": "not-a-session"}, data=b"v")
    assert reply.status_code == 500 and reply.text.startswith('invalid session "not-a-session"'), reply.text
    reply = agent.put("/v1/kv/sessions-test/x", params={"acquire": "a", "cas": "0"}, data=b"v")
    assert reply.status_code == 400 and "Conflicting flags" in reply.text


def test_acquire_release_and_lock_index(consul_api):
    first = consul_api.session.create(lock_delay=0)
    second = consul_api.session.create(lock_delay=0)
    name = key()
    try:
        assert consul_api.kv.put(name, "one", acquire=first) is True
        _, entry = consul_api.kv.get(name)
        assert entry["Session"] == first and entry["LockIndex"] == 1 and entry["Value"] == b"one"
        assert consul_api.kv.put(name, "two", acquire=second) is False, "held by another session"
        assert consul_api.kv.put(name, "again", acquire=first) is True, "the holder may acquire again"
        _, entry = consul_api.kv.get(name)
        assert entry["LockIndex"] == 1 and entry["Value"] == b"again"

        assert consul_api.kv.put(name, "x", release=second) is False, "only the holder releases"
        assert consul_api.kv.put(name, "released", release=first) is True
        _, entry = consul_api.kv.get(name)
        assert "Session" not in entry and entry["LockIndex"] == 1 and entry["Value"] == b"released"

        assert consul_api.kv.put(name, "three", acquire=second) is True
        _, entry = consul_api.kv.get(name)
        assert entry["Session"] == second and entry["LockIndex"] == 2
        # A plain write keeps the lock; a delete removes the key and its lock.
        assert consul_api.kv.put(name, "plain") is True
        assert consul_api.kv.get(name)[1]["Session"] == second
    finally:
        consul_api.session.destroy(first)
        consul_api.session.destroy(second)
        consul_api.kv.delete(name)


def test_invalidation_releases_or_deletes_and_starts_the_lock_delay(consul_api):
    releasing = consul_api.session.create(lock_delay=3, behavior="release")
    deleting = consul_api.session.create(lock_delay=0, behavior="delete")
    kept, gone = key("kept"), key("gone")
    assert consul_api.kv.put(kept, "v", acquire=releasing)
    assert consul_api.kv.put(gone, "v", acquire=deleting)
    index, _ = consul_api.kv.get(kept)

    consul_api.session.destroy(releasing)
    consul_api.session.destroy(deleting)
    new_index, entry = consul_api.kv.get(kept)
    assert "Session" not in entry and entry["Value"] == b"v"
    assert int(new_index) > int(index), "releasing a lock moves the key's index"
    assert consul_api.kv.get(gone)[1] is None, "Behavior delete removes the key"

    other = consul_api.session.create(lock_delay=0)
    try:
        assert consul_api.kv.put(kept, "w", acquire=other) is False, "the lock delay holds the key"
        wait_until(lambda: consul_api.kv.put(kept, "w", acquire=other), timeout=6, what="the lock delay to end")
    finally:
        consul_api.session.destroy(other)
        consul_api.kv.delete(kept)


def test_a_session_tied_to_a_check_ends_when_the_check_fails(consul_api):
    service = f"locked-{uuid.uuid4().hex[:8]}"
    consul_api.agent.service.register(service, service_id=service, port=1, check=consul.Check.ttl("30s"))
    check_id = f"service:{service}"
    consul_api.agent.check.ttl_pass(check_id)
    session = consul_api.session.create(checks=["serfHealth", check_id], lock_delay=0)
    name = key()
    try:
        assert consul_api.kv.put(name, "v", acquire=session)
        consul_api.agent.check.ttl_fail(check_id, "down")
        wait_until(lambda: consul_api.session.info(session)[1] is None, timeout=5, what="the session to be invalidated")
        assert "Session" not in consul_api.kv.get(name)[1]
    finally:
        consul_api.agent.service.deregister(service)
        consul_api.kv.delete(name)


def test_session_blocking_query_returns_on_change(consul_api):
    index, _ = consul_api.session.list()
    created = {}

    def create_later():
        time.sleep(0.5)
        created["id"] = consul_api.session.create()

    thread = threading.Thread(target=create_later)
    thread.start()
    started = time.monotonic()
    new_index, sessions = consul_api.session.list(index=index, wait="10s")
    thread.join()
    assert time.monotonic() - started < 5, "the blocking query must return on the change"
    assert int(new_index) > int(index)
    consul_api.session.destroy(created["id"])


def test_transactions_are_all_or_nothing(consul_api, agent):
    a, b = key("txn-a"), key("txn-b")

    def op(verb, name, value=None, **extra):
        body = {"Verb": verb, "Key": name, **extra}
        if value is not None:
            body["Value"] = base64.b64encode(value).decode()
        return {"KV": body}

    result = consul_api.txn.put([op("set", a, b"1"), op("cas", b, b"2", Index=0), op("get", a)])
    assert result["Errors"] is None
    set_result, cas_result, get_result = (entry["KV"] for entry in result["Results"])
    assert set_result["Key"] == a and set_result["Value"] is None, "write results carry no value"
    assert set_result["ModifyIndex"] == cas_result["ModifyIndex"], "one transaction, one index"
    assert base64.b64decode(get_result["Value"]) == b"1"

    # One failing check and nothing is applied; every failure is named.
    modify = consul_api.kv.get(a)[1]["ModifyIndex"]
    reply = agent.put("/v1/txn", json=[op("set", a, b"changed"), op("check-index", b, Index=modify + 1000),
                                       op("get", key("missing"))])
    assert reply.status_code == 409, reply.text
    errors = reply.json()["Errors"]
    assert [error["OpIndex"] for error in errors] == [1, 2]
    assert "failed index check" in errors[0]["What"] and "doesn't exist" in errors[1]["What"]
    assert consul_api.kv.get(a)[1]["Value"] == b"1"
    with pytest.raises(consul.exceptions.ClientError):
        consul_api.txn.put([op("check-not-exists", a)])

    # Locks inside a transaction, and deletes.
    session = consul_api.session.create(lock_delay=0)
    result = consul_api.txn.put([op("lock", a, b"locked", Session=session), op("check-session", a, Session=session)])
    assert result["Results"][0]["KV"]["Session"] == session and result["Results"][0]["KV"]["LockIndex"] == 1
    result = consul_api.txn.put([op("unlock", a, b"free", Session=session), op("delete", b)])
    assert consul_api.kv.get(b)[1] is None and "Session" not in consul_api.kv.get(a)[1]
    consul_api.session.destroy(session)

    reply = agent.put("/v1/txn", json=[op("get", a)] * 129)
    assert reply.status_code == 413 and "too many operations" in reply.text
    consul_api.kv.delete(a)


def test_leader_election_elects_one_and_fails_over(agent):
    election_key = key("leader")
    candidates = {}
    outputs = {}

    def start(name):
        process = subprocess.Popen(
            [sys.executable, str(LEADER_PROGRAM), str(agent.api_port), election_key, name],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        candidates[name] = process
        outputs[name] = []
        threading.Thread(target=lambda: [outputs[name].append(line.strip()) for line in process.stdout], daemon=True).start()

    def leaders():
        return [name for name, lines in outputs.items() if f"LEADER {name}" in lines]

    try:
        start("alpha")
        start("beta")
        wait_until(lambda: len(leaders()) == 1, timeout=10, what="one leader")
        time.sleep(1.5)
        [first] = leaders()
        assert len(leaders()) == 1, f"two leaders at once: {outputs}"
        # The leader dies without a word: its session expires (2 x TTL at most) and the other takes over.
        candidates[first].send_signal(signal.SIGKILL)
        candidates[first].wait()
        started = time.monotonic()
        second = "beta" if first == "alpha" else "alpha"
        wait_until(lambda: f"LEADER {second}" in outputs[second], timeout=30, what=f"{second} to take over")
        assert time.monotonic() - started <= 22, "the session expires within twice its 10 s TTL (plus the 1 s lock delay)"
    finally:
        for process in candidates.values():
            if process.poll() is None:
                process.kill()
                process.wait()
