"""`--log-forward`: instances' lines reach a real rsyslog over UDP and TCP as RFC 5424 with their
origin in structured data; over TCP none is lost while the collector restarts or the agent does;
and `--log-format json|logfmt` for the agent's own lines."""

import json
import re
import time

import requests

from support.flotilla import app_definition, wait_until
from support.rsyslog import Rsyslog

NUMBERED = re.compile(r"^n (\d+)$")


def test_lines_reach_rsyslog_over_udp_and_tcp_with_their_origin(make_agent, app_ids, tmp_path):
    collector = Rsyslog(tmp_path / "rsyslog")
    collector.start()
    try:
        target = f"127.0.0.1:{collector.port}"
        agent = make_agent(node_name="forward-node", extra_args=["--log-forward", f"syslog+udp://{target}", "--log-forward", f"syslog+tcp://{target}"])
        app_id = app_ids.new()
        agent.create_app(
            app_definition(app_id, 'echo \'hello "quoted" [brackets] back\\slash\'; echo "oops on stderr" >&2; for i in 1 2 3; do echo "n $i"; done; sleep 60')
        )
        (task,) = agent.wait_for_running(app_id, 1)

        def complete(messages):
            for transport in ("imudp", "imtcp"):
                texts = [m.text for m in messages if m.input == transport]
                if "oops on stderr" not in texts or "n 3" not in texts:
                    return False
            return True

        messages = collector.wait_for(complete, what="the app's lines over UDP and TCP")
        for transport in ("imudp", "imtcp"):
            received = [m for m in messages if m.input == transport]
            hello = next(m for m in received if m.text.startswith("hello"))
            assert hello.text == 'hello "quoted" [brackets] back\\slash'
            assert hello.sd == {"app": app_id, "instance": task["id"], "node": "forward-node", "stream": "stdout"}, hello
            # The SD values escape what RFC 5424 says; here the app id has none, the raw SD is plain.
            assert hello.structured_data.startswith("[flotilla@32473 ")
            assert hello.pri == 14  # user.info
            assert hello.hostname == "forward-node"
            assert hello.app_name == app_id.lstrip("/").replace("/", "-")[:48]  # RFC 5424 caps APP-NAME at 48
            assert hello.procid == task["id"]
            oops = next(m for m in received if m.text == "oops on stderr")
            assert oops.pri == 11  # user.err
            assert oops.sd["stream"] == "stderr"
            assert [m.text for m in received if NUMBERED.match(m.text)] == ["n 1", "n 2", "n 3"]

        metrics = requests.get(agent.url + "/metrics", timeout=10).text
        sent = re.findall(r'^flotilla_log_forward_lines_total\{target="syslog\+(udp|tcp)://[^"]+"\} (\d+)', metrics, re.M)
        assert {transport for transport, count in sent if int(count) >= 5} == {"udp", "tcp"}, metrics
        assert "flotilla_log_forward_dropped_lines_total" in metrics
        assert "flotilla_log_forward_lag_bytes" in metrics
    finally:
        collector.stop()


def numbers(messages, instance):
    return [int(NUMBERED.match(m.text).group(1)) for m in messages if m.input == "imtcp" and m.sd.get("instance") == instance and NUMBERED.match(m.text)]


def test_tcp_loses_no_line_while_the_collector_and_the_agent_restart(make_agent, app_ids, tmp_path):
    collector = Rsyslog(tmp_path / "rsyslog")
    collector.start()
    try:
        # The instance outlives the agent's restart and keeps writing meanwhile.
        agent = make_agent(on_exit="keep", extra_args=["--log-forward", f"syslog+tcp://127.0.0.1:{collector.port}"])
        app_id = app_ids.new()
        agent.create_app(app_definition(app_id, 'i=0; while true; do i=$((i+1)); echo "n $i"; sleep 0.02; done'))
        (task,) = agent.wait_for_running(app_id, 1)
        instance = task["id"]
        collector.wait_for(lambda messages: len(numbers(messages, instance)) >= 20, what="the first numbered lines")

        # The collector goes away for a few seconds while the app writes on.
        collector.stop()
        before = max(numbers(collector.messages(), instance))
        time.sleep(3)
        collector.start()
        collector.wait_for(lambda messages: max(numbers(messages, instance)) > before + 200, timeout=30, what="lines written while rsyslog was down")

        # The agent restarts; forwarding resumes from its checkpoint.
        assert agent.stop()
        time.sleep(2)
        agent.restart()
        stdout = agent.sandbox(instance) / "stdout"
        written = int(NUMBERED.match(stdout.read_text().splitlines()[-2]).group(1))
        received = collector.wait_for(
            lambda messages: max(numbers(messages, instance)) >= written + 50, timeout=30, what="lines written while the agent was down"
        )
        seen = numbers(received, instance)
        highest = max(seen)
        missing = sorted(set(range(1, highest + 1)) - set(seen))
        assert not missing, f"{len(missing)} lines lost, first {missing[:20]}"
        # Only the batches out when a connection was lost (or the agent stopped) are sent twice.
        duplicates = len(seen) - len(set(seen))
        assert duplicates <= 400, f"{duplicates} lines sent twice"
        metrics = requests.get(agent.url + "/metrics", timeout=10).text
        dropped = re.search(r"^flotilla_log_forward_dropped_lines_total\{[^}]*\} (\d+)", metrics, re.M)
        assert dropped and int(dropped.group(1)) == 0, metrics
    finally:
        collector.stop()


def agent_lines(agent):
    return [line for line in agent.log_text().splitlines() if line and not line.startswith("=== test harness")]


def test_agent_logs_as_json(make_agent):
    agent = make_agent(extra_args=["--log-format", "json"])
    lines = wait_until(lambda: agent_lines(agent) if any("API listening" in l for l in agent_lines(agent)) else None, what="the agent's log")
    records = [json.loads(line) for line in lines]
    for record in records:
        assert set(record) == {"time", "level", "label", "message", "metadata"}, record
        assert re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$", record["time"])
    starting = next(record for record in records if record["message"].startswith("starting flotilla"))
    assert starting["level"] == "info"
    assert starting["label"] == "flotilla"
    assert starting["metadata"]["node"] == "test-node"


LOGFMT = re.compile(r'^time=(\S+) level=(\w+) label=(\S+) msg="((?:[^"\\]|\\.)*)"((?: [^\s=]+=(?:"(?:[^"\\]|\\.)*"|\S+))*)$')


def test_agent_logs_as_logfmt(make_agent):
    agent = make_agent(extra_args=["--log-format", "logfmt"])
    lines = wait_until(lambda: agent_lines(agent) if any("API listening" in l for l in agent_lines(agent)) else None, what="the agent's log")
    for line in lines:
        assert LOGFMT.match(line), f"not logfmt: {line!r}"
    starting = next(line for line in lines if 'msg="starting flotilla' in line)
    assert " level=info " in starting
    assert " node=test-node" in starting
