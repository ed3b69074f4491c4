"""Reads an agent's `/v2/events` server-sent event stream on a background thread.

    with EventStream(agent) as events:
        ...
        event = events.wait_for(lambda e: e["eventType"] == "deployment_success", timeout=10)

Each event is the JSON object of its `data:` line, with `eventType` set from the `event:` line
when the data does not carry one.
"""

import json
import socket
import threading
import time

import requests


class EventStream:
    def __init__(self, agent, event_types=()):
        self.url = agent.url + "/v2/events"
        self.params = [("event_type", name) for name in event_types]
        self._events = []
        self._lock = threading.Lock()
        self._response = None
        self._connected = threading.Event()
        self._closing = False
        self.error = None
        self._thread = threading.Thread(target=self._read, name="event-stream", daemon=True)

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc_info):
        self.close()

    def start(self, timeout=10):
        self._thread.start()
        if not self._connected.wait(timeout):
            raise AssertionError(f"GET {self.url} sent no response headers within {timeout}s")
        if self.error is not None:
            raise AssertionError(f"GET {self.url} failed: {self.error!r}")
        # The agent sends `event_stream_attached` first: once it is here, later events will be too.
        self.wait_for(lambda event: event.get("eventType") == "event_stream_attached", timeout=timeout)

    def close(self):
        """Ends the stream. The reader thread is blocked in a read that holds the response's
        buffer lock, so closing the response from here would wait for the next event: shutting
        the socket down instead ends the read at once, and the thread closes the response."""
        self._closing = True
        response = self._response
        connection = getattr(getattr(response, "raw", None), "connection", None)
        sock = getattr(connection, "sock", None)
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:  # already closed, by the agent or the thread
                pass
        self._thread.join(timeout=5)

    def _read(self):
        try:
            with requests.get(self.url, params=self.params, stream=True, timeout=(5, None)) as response:
                self._response = response
                self._connected.set()
                if response.status_code != 200:
                    self.error = AssertionError(f"GET {self.url}: {response.status_code} {response.text[:200]}")
                    return
                event_type = None
                data = []
                for raw in response.iter_lines(decode_unicode=True):
                    line = raw or ""
                    if line.startswith("event:"):
                        event_type = line[len("event:"):].strip()
                    elif line.startswith("data:"):
                        data.append(line[len("data:"):].lstrip())
                    elif line == "" and data:
                        event = json.loads("\n".join(data))
                        if isinstance(event, dict):
                            event.setdefault("eventType", event_type)
                        with self._lock:
                            self._events.append(event)
                        event_type, data = None, []
        except Exception as error:  # after close() expected; otherwise kept for the test to report
            if not self._closing:
                self.error = error
            self._connected.set()

    def events(self, event_type=None) -> list:
        with self._lock:
            found = list(self._events)
        if event_type is not None:
            found = [event for event in found if event.get("eventType") == event_type]
        return found

    def wait_for(self, predicate, timeout=10, what=None):
        """The first event `predicate` accepts, waiting up to `timeout` seconds for it."""
        deadline = time.monotonic() + timeout
        while True:
            for event in self.events():
                if predicate(event):
                    return event
            if time.monotonic() >= deadline:
                seen = sorted({str(event.get("eventType")) for event in self.events()})
                raise AssertionError(
                    f"no {what or 'matching'} event on {self.url} within {timeout}s; event types seen: {seen}"
                    + (f"; stream error: {self.error!r}" if self.error else "")
                )
            time.sleep(0.05)
