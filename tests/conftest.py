"""Shared by every Python test suite under tests/ (pytest.ini puts tests/ on the import path, so
`support` imports everywhere): attaches the log of every agent a failing test used to its report."""

import pytest

from support.flotilla import AGENTS_KEY, Agent


def agents_of(item) -> list:
    """The agents a test used: fixture values that are agents, and those it recorded itself."""
    agents = []
    for value in getattr(item, "funcargs", {}).values():
        if isinstance(value, Agent) and value not in agents:
            agents.append(value)
    for agent in item.stash.get(AGENTS_KEY, []):
        if agent not in agents:
            agents.append(agent)
    return agents


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Attach the tail of each agent's log to every failing test's report."""
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        agents = agents_of(item)
        for index, agent in enumerate(agents):
            title = "flotilla agent log" if len(agents) == 1 else f"flotilla agent log ({index + 1})"
            report.sections.append((title, agent.log_tail()))
