"""Fixtures for the integration tests: agents started per test, each with its own data directory,
API port and task port range, and unique app ids.

Every agent a test starts is stopped afterwards, and the test fails if any process started from
that agent's sandboxes is still alive then.
"""

import re
import uuid

import pytest

from support.flotilla import AGENTS_KEY, flotilla_binary, start_agent


@pytest.fixture(scope="session")
def binary():
    return flotilla_binary()


@pytest.fixture
def make_agent(request, binary, tmp_path_factory):
    """Starts agents: `make_agent(cpus=1, mem=512, on_exit="stop", extra_args=[...])`.

    The agents are stopped at the end of the test, then checked for leftover processes.
    """
    started = []
    request.node.stash[AGENTS_KEY] = started

    def make(**options):
        agent = start_agent(binary, tmp_path_factory.mktemp("agent"), **options)
        started.append(agent)
        return agent

    yield make
    problems = []
    for agent in started:
        if agent.on_exit != "stop" or agent.killed:
            # Instances outlive this agent by design (--on-exit keep, or it was killed and the
            # test ended before restarting it): let an agent that stops them clean up.
            agent.stop()
            if agent.instance_processes():
                agent.restart(on_exit="stop")
        agent.stop()
        try:
            agent.assert_no_leftovers()
        except AssertionError as error:
            problems.append(str(error))
    assert not problems, "\n".join(problems)


@pytest.fixture
def agent(make_agent):
    """An agent of this test alone, with the default options (4 cpus, 4096 MiB, --on-exit stop)."""
    return make_agent()


@pytest.fixture(scope="module")
def shared_agent(binary, tmp_path_factory):
    """One agent with the default options for a whole module, for tests that only add apps."""
    agent = start_agent(binary, tmp_path_factory.mktemp("shared-agent"))
    try:
        yield agent
    finally:
        agent.stop()
        agent.assert_no_leftovers()


class AppIds:
    """Unique app ids under /it, named after the test."""

    def __init__(self, test_name: str):
        slug = re.sub(r"[^a-z0-9]+", "-", test_name.lower()).strip("-")
        self.default_name = (slug.removeprefix("test-") or "app")[:40].strip("-")

    def new(self, name: str = None) -> str:
        return f"/it/{name or self.default_name}-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def app_ids(request):
    return AppIds(request.node.name)


@pytest.fixture
def etcd(tmp_path_factory):
    """A one-member etcd of this test alone, on loopback."""
    from support.etcd import EtcdCluster

    cluster = EtcdCluster(tmp_path_factory.mktemp("etcd"))
    try:
        yield cluster
    finally:
        cluster.stop()
