"""Drive a real `flotilla agent` with the unmodified `marathon` client from PyPI (0.13.0).

The client builds every model with ``cls(**attributes)``, so one JSON key it does not know, a
missing nested object or a timestamp in another format makes it raise: these tests catch such
incompatibilities as well as behavioural differences from Marathon 1.x.

Two quirks of the client shape how the tests call it:
- ``port_definitions=[...]`` cannot be sent: serialising nested models uses
  ``collections.Iterable``, which Python 3.10 removed. The tests ask for ports with ``ports=[0]``.
- Ids are used with their leading slash, so the client requests paths such as
  ``/v2/apps//compat/x/tasks``; the server has to accept the doubled slash, as Marathon does.
"""

import json
import threading
from functools import partial

import pytest
import requests
from marathon import MarathonApp, MarathonClient, MarathonTask
from marathon.exceptions import ConflictError, MarathonHttpError, NotFoundError
from marathon.models import MarathonDeployment, MarathonInfo, MarathonQueueItem
from marathon.models.events import (
    MarathonApiPostEvent,
    MarathonDeploymentSuccess,
    MarathonStatusUpdateEvent,
)
from support.flotilla import wait_until

HTTP_SERVER_CMD = "python3 -m http.server $PORT0 --bind 127.0.0.1"
SLEEP_CMD = "sleep 1000"
ECHO_ENV_CMD = 'echo "X=$X"; sleep 1000'

# Small enough that every test's tasks fit at once on the agent's 4 cpus / 4096 MB.
TASK_RESOURCES = {"cpus": 0.1, "mem": 64}


# --- helpers --------------------------------------------------------------------------------


def create_app(client, app_id, **definition):
    """POST the app and check the 201 answer; return the MarathonApp the server sent back."""
    created = client.create_app(app_id, MarathonApp(**{**TASK_RESOURCES, **definition}))
    assert isinstance(created, MarathonApp), "POST /v2/apps must answer 201 with the app"
    assert created.id == app_id
    assert created.version, "the created app must carry its version"
    return created


def settled_tasks(client, app_id, count):
    """The app's tasks if there are exactly `count` (>= 1), all TASK_RUNNING; otherwise None."""
    tasks = client.list_tasks(app_id)
    if len(tasks) == count and all(task.state == "TASK_RUNNING" for task in tasks):
        return tasks
    return None


def wait_for_running_tasks(client, app_id, count, timeout=20):
    """Wait until the app has settled on exactly `count` running tasks; return them."""
    try:
        return wait_until(
            lambda: settled_tasks(client, app_id, count),
            timeout,
            what=f"exactly {count} TASK_RUNNING tasks of {app_id}",
        )
    except AssertionError as timed_out:
        now = [(task.id, task.state) for task in client.list_tasks(app_id)]
        raise AssertionError(f"{timed_out}\ntasks now: {now}") from None


def task_ids(tasks):
    return {task.id for task in tasks}


def all_replaced(client, app_id, old_ids):
    """True once the app runs as many tasks as before, none of them one of `old_ids`."""
    tasks = settled_tasks(client, app_id, len(old_ids))
    return tasks is not None and task_ids(tasks).isdisjoint(old_ids)


def answers_http_200(port):
    try:
        return requests.get(f"http://127.0.0.1:{port}/", timeout=2).status_code == 200
    except requests.RequestException:
        return False


def deployment_result(result):
    """PUT, DELETE and restart answer {"version", "deploymentId"}; check and return it."""
    assert isinstance(result, dict), f"expected a JSON object, got {result!r}"
    assert result.get("deploymentId"), f"no deploymentId in {result!r}"
    assert result.get("version"), f"no version in {result!r}"
    return result


def deployments_of(client, app_id):
    return [d for d in client.list_deployments() if app_id in (d.affected_apps or [])]


# --- server information ---------------------------------------------------------------------


def test_ping(client):
    assert client.ping().strip() == b"pong"


def test_get_info(client):
    info = client.get_info()
    assert isinstance(info, MarathonInfo)
    assert isinstance(info.name, str) and info.name
    assert isinstance(info.version, str) and info.version
    assert info.elected is True, "a single agent is always its own leader"


def test_get_leader(client, agent):
    assert client.get_leader()["leader"] == f"127.0.0.1:{agent.api_port}"


# --- apps and tasks -------------------------------------------------------------------------


def test_create_app_runs_tasks_on_their_ports(client, agent, app_ids):
    app_id = app_ids.new()
    create_app(client, app_id, cmd=HTTP_SERVER_CMD, instances=2, ports=[0])

    tasks = wait_for_running_tasks(client, app_id, 2)
    for task in tasks:
        assert isinstance(task, MarathonTask)
        assert task.host
        assert task.started_at is not None, "a running task must have startedAt"
        assert len(task.ports) == 1, f"task {task.id} should have one port: {task.ports}"
        assert task.ports[0] in agent.task_ports, "ports must come from the agent's --ports"
    assert len({task.ports[0] for task in tasks}) == 2, "two tasks must not share a port"

    # Each task really listens on the port it was given in $PORT0.
    for port in (task.ports[0] for task in tasks):
        wait_until(partial(answers_http_200, port), what=f"HTTP 200 on port {port}")

    # /v2/tasks lists them too, with their appId (the client fills app_id only for /v2/apps/x/tasks).
    ours = [task for task in client.list_tasks() if task.app_id == app_id]
    assert task_ids(ours) == task_ids(tasks)

    # list_endpoints pairs each task port with a service port, so servicePorts must match ports.
    endpoints = [e for e in client.list_endpoints() if e.app_id == app_id]
    assert {e.task_port for e in endpoints} == {task.ports[0] for task in tasks}


def test_list_apps_and_get_app_embed_tasks_and_counts(client, app_ids):
    app_id = app_ids.new()
    create_app(client, app_id, cmd=SLEEP_CMD, instances=2)
    running = wait_for_running_tasks(client, app_id, 2)

    listed = {app.id: app for app in client.list_apps(embed_tasks=True, embed_counts=True)}
    assert app_id in listed
    app = listed[app_id]
    assert app.tasks_running == 2
    assert task_ids(app.tasks) == task_ids(running)

    assert [app.id for app in client.list_apps(app_id=app_id)] == [app_id]

    app = client.get_app(app_id, embed_tasks=True)
    assert app.id == app_id
    assert app.cmd == SLEEP_CMD
    assert app.instances == 2
    assert app.cpus == TASK_RESOURCES["cpus"]
    assert app.mem == TASK_RESOURCES["mem"]
    assert task_ids(app.tasks) == task_ids(running)
    assert all(task.state == "TASK_RUNNING" for task in app.tasks)


def test_scale_app_and_read_versions(client, app_ids):
    app_id = app_ids.new()
    created = create_app(client, app_id, cmd=SLEEP_CMD, instances=1)
    wait_for_running_tasks(client, app_id, 1)

    scaled_up = deployment_result(client.scale_app(app_id, instances=3))
    wait_for_running_tasks(client, app_id, 3)
    assert client.get_app(app_id).instances == 3

    scaled_down = deployment_result(client.scale_app(app_id, instances=1))
    wait_for_running_tasks(client, app_id, 1)
    assert client.get_app(app_id).instances == 1

    written = {created.version, scaled_up["version"], scaled_down["version"]}
    assert len(written) == 3, f"every change needs a version of its own: {written}"
    assert written <= set(client.list_versions(app_id))

    original = client.get_version(app_id, created.version)
    assert isinstance(original, MarathonApp)
    assert original.id == app_id
    assert original.instances == 1
    assert client.get_version(app_id, scaled_up["version"]).instances == 3


def test_update_app_then_roll_back(client, app_ids):
    app_id = app_ids.new()
    created = create_app(client, app_id, cmd=ECHO_ENV_CMD, instances=1, env={"X": "1"})
    [first_task] = wait_for_running_tasks(client, app_id, 1)

    # A PUT changes only the fields it names.
    update = deployment_result(client.update_app(app_id, MarathonApp(env={"X": "2"})))
    assert update["version"] != created.version
    app = client.get_app(app_id)
    assert app.env == {"X": "2"}
    assert app.cmd == ECHO_ENV_CMD
    assert app.instances == 1
    assert update["version"] in client.list_versions(app_id)

    # A config change replaces the running task with one of the new version.
    def runs_only_version(version):
        tasks = settled_tasks(client, app_id, 1)
        return tasks is not None and tasks[0].version == version

    wait_until(lambda: runs_only_version(update["version"]), what="a task of the new version")
    assert client.list_tasks(app_id)[0].id != first_task.id

    rollback = deployment_result(client.rollback_app(app_id, created.version))
    assert client.get_app(app_id).env == {"X": "1"}
    wait_until(lambda: runs_only_version(rollback["version"]), what="a task of the rolled-back version")


def test_kill_task_is_replaced(client, app_ids):
    app_id = app_ids.new()
    create_app(client, app_id, cmd=SLEEP_CMD, instances=2)
    victim, survivor = wait_for_running_tasks(client, app_id, 2)

    killed = client.kill_task(app_id, victim.id)
    assert isinstance(killed, MarathonTask), f'expected {{"task": ...}}, got {killed!r}'
    assert killed.id == victim.id

    def replaced():
        tasks = settled_tasks(client, app_id, 2)
        return tasks is not None and victim.id not in task_ids(tasks) and survivor.id in task_ids(tasks)

    wait_until(replaced, what=f"task {victim.id} to be replaced")
    assert client.get_app(app_id).instances == 2


def test_kill_task_with_scale_lowers_instances(client, app_ids):
    app_id = app_ids.new()
    create_app(client, app_id, cmd=SLEEP_CMD, instances=2)
    victim, survivor = wait_for_running_tasks(client, app_id, 2)

    client.kill_task(app_id, victim.id, scale=True)

    wait_until(lambda: client.get_app(app_id).instances == 1, what="instances to drop to 1")
    [remaining] = wait_for_running_tasks(client, app_id, 1)
    assert remaining.id == survivor.id


def test_kill_given_tasks_are_replaced(client, app_ids):
    app_id = app_ids.new()
    create_app(client, app_id, cmd=SLEEP_CMD, instances=2)
    old_ids = task_ids(wait_for_running_tasks(client, app_id, 2))

    assert client.kill_given_tasks(sorted(old_ids)) is True

    wait_until(lambda: all_replaced(client, app_id, old_ids), what="both tasks to be replaced")
    assert client.get_app(app_id).instances == 2


def test_restart_app_replaces_tasks(client, app_ids):
    app_id = app_ids.new()
    create_app(client, app_id, cmd=SLEEP_CMD, instances=2)
    old_ids = task_ids(wait_for_running_tasks(client, app_id, 2))

    deployment_result(client.restart_app(app_id))

    wait_until(lambda: all_replaced(client, app_id, old_ids), what="the restart to replace both tasks")


# --- deployments and the launch queue -------------------------------------------------------


def test_list_deployments_and_queue(client, app_ids):
    deployments = client.list_deployments()
    assert isinstance(deployments, list)
    assert all(isinstance(d, MarathonDeployment) for d in deployments)
    queue = client.list_queue()
    assert isinstance(queue, list)
    assert all(isinstance(item, MarathonQueueItem) for item in queue)

    # Once its tasks run, an app has no deployment left and nothing queued.
    app_id = app_ids.new()
    create_app(client, app_id, cmd=SLEEP_CMD, instances=1)
    wait_for_running_tasks(client, app_id, 1)
    wait_until(lambda: not deployments_of(client, app_id), what=f"{app_id}'s deployment to finish")
    assert app_id not in [item.app.id for item in client.list_queue()]


def test_app_that_cannot_fit_waits_in_the_queue(client, app_ids):
    app_id = app_ids.new()
    create_app(client, app_id, cmd=SLEEP_CMD, instances=1, mem=1_000_000)

    def queued():
        return next((item for item in client.list_queue() if item.app.id == app_id), None)

    item = wait_until(queued, what=f"{app_id} in the launch queue")
    assert item.count > 0
    assert item.app.mem == 1_000_000
    assert client.list_tasks(app_id) == []
    assert deployments_of(client, app_id), "the app's deployment stays open while it cannot launch"

    # Its deployment never finishes, so only a forced delete may remove it.
    deployment_result(client.delete_app(app_id, force=True))
    with pytest.raises(NotFoundError):
        client.get_app(app_id)
    wait_until(lambda: not queued(), what=f"{app_id} to leave the launch queue")
    wait_until(lambda: not deployments_of(client, app_id), what=f"{app_id}'s deployment to go")


# --- deletion and errors --------------------------------------------------------------------


def test_delete_app(client, app_ids):
    app_id = app_ids.new()
    create_app(client, app_id, cmd=SLEEP_CMD, instances=1)
    [task] = wait_for_running_tasks(client, app_id, 1)

    deployment_result(client.delete_app(app_id))

    with pytest.raises(NotFoundError):
        client.get_app(app_id)
    wait_until(
        lambda: task.id not in task_ids(client.list_tasks()),
        what=f"task {task.id} to stop after its app was deleted",
    )


def test_create_existing_app_conflicts(client, app_ids):
    app_id = app_ids.new()
    create_app(client, app_id, cmd=SLEEP_CMD, instances=0)

    with pytest.raises(ConflictError) as raised:
        client.create_app(app_id, MarathonApp(cmd=SLEEP_CMD, instances=0, **TASK_RESOURCES))
    assert raised.value.status_code == 409


def test_negative_instances_are_rejected(client, app_ids):
    app_id = app_ids.new()

    with pytest.raises(MarathonHttpError) as raised:
        client.create_app(app_id, MarathonApp(cmd=SLEEP_CMD, instances=-1, **TASK_RESOURCES))
    error = raised.value
    assert error.status_code == 422
    # The client reads message and details only from an application/json body.
    explanation = f"{error.error_message} {json.dumps(getattr(error, 'error_details', None))}"
    assert "instances" in explanation, f"the error should name the field: {explanation}"

    with pytest.raises(NotFoundError):
        client.get_app(app_id)


def test_malformed_json_is_a_400_with_a_message(agent):
    response = requests.post(
        f"{agent.url}/v2/apps",
        data="{bad",
        headers={"Content-Type": "application/json"},
        timeout=10,
    )
    assert response.status_code == 400
    body = response.json()
    assert isinstance(body.get("message"), str) and body["message"]


# --- nested ids -----------------------------------------------------------------------------


def test_nested_app_id(client, app_ids):
    app_id = app_ids.new("shop/cart")  # /compat/shop/cart-<random>
    create_app(client, app_id, cmd=SLEEP_CMD, instances=1)

    assert client.get_app(app_id).id == app_id
    assert client.get_app(app_id.lstrip("/")).id == app_id
    [task] = wait_for_running_tasks(client, app_id, 1)
    assert [app.id for app in client.list_apps(app_id="shop/cart") if app.id == app_id] == [app_id]
    assert client.kill_task(app_id, task.id).id == task.id


# --- event stream ---------------------------------------------------------------------------


class _ConnectionSignallingSession(requests.Session):
    """A requests session that says when the event stream's response headers have arrived."""

    def __init__(self):
        super().__init__()
        self.connected = threading.Event()

    def get(self, *args, **kwargs):
        response = super().get(*args, **kwargs)
        self.connected.set()
        return response


class EventCollector:
    """Reads the client's parsed event stream on a daemon thread and keeps every event.

    The thread ends when the agent closes the stream; being a daemon, it never holds up exit.
    """

    def __init__(self, url):
        self._session = _ConnectionSignallingSession()
        self._client = MarathonClient(url, sse_session=self._session)
        self._events = []
        self._lock = threading.Lock()
        self.error = None
        self._thread = threading.Thread(target=self._read, name="event-stream", daemon=True)

    def start(self, timeout=10):
        self._thread.start()
        if not self._session.connected.wait(timeout):
            raise AssertionError(
                f"GET /v2/events sent no response headers within {timeout}s: "
                "an event stream must answer at once, before the first event"
            )

    def events(self):
        if self.error is not None:
            raise AssertionError(f"the client could not read the event stream: {self.error!r}")
        with self._lock:
            return list(self._events)

    def _read(self):
        try:
            for event in self._client.event_stream():
                with self._lock:
                    self._events.append(event)
        except Exception as error:  # reported to the test by events()
            self.error = error


def test_event_stream_reports_a_deployment(client, agent, app_ids):
    collector = EventCollector(agent.url)
    collector.start()

    app_id = app_ids.new()
    created = create_app(client, app_id, cmd=SLEEP_CMD, instances=1)
    deployment_ids = {deployment.id for deployment in created.deployments}
    assert deployment_ids, "POST /v2/apps should answer with the deployment it started"

    def posted(event):
        definition = getattr(event, "app_definition", None) or {}
        return isinstance(event, MarathonApiPostEvent) and definition.get("id") == app_id

    def running(event):
        return (
            isinstance(event, MarathonStatusUpdateEvent)
            and getattr(event, "app_id", None) == app_id
            and getattr(event, "task_status", None) == "TASK_RUNNING"
        )

    def deployed(event):
        return isinstance(event, MarathonDeploymentSuccess) and getattr(event, "id", None) in deployment_ids

    expected = {
        "api_post_event": posted,
        "status_update_event with TASK_RUNNING": running,
        "deployment_success": deployed,
    }
    missing = list(expected)

    def all_seen():
        events = collector.events()
        missing[:] = [name for name, matches in expected.items() if not any(map(matches, events))]
        return not missing

    try:
        wait_until(all_seen, timeout=20)
    except AssertionError:
        seen = sorted({event.event_type for event in collector.events()})
        raise AssertionError(
            f"no {missing} event for {app_id} within 20s; event types seen: {seen}"
        ) from None
