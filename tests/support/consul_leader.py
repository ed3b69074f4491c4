"""A leader-election program built the way Consul's leader-election guide describes, on py-consul
only: each candidate holds a session with a TTL, tries to acquire one key with it, renews the
session while it runs, and watches the key with blocking queries to take over when it is freed.

Usage: python consul_leader.py PORT KEY NAME
Prints `LEADER NAME` (flushed) each time it becomes the leader, `FOLLOWER holder=…` when it sees
another holder. Runs until killed.
"""

import sys
import time

import consul


def main():
    port, key, name = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    client = consul.Consul(host="127.0.0.1", port=port)
    session = client.session.create(name=f"leader-{name}", ttl=10, lock_delay=1, behavior="release")
    leading = False
    index = None
    last_renew = time.monotonic()
    while True:
        if time.monotonic() - last_renew > 3:
            client.session.renew(session)
            last_renew = time.monotonic()
        if not leading:
            if client.kv.put(key, name, acquire=session):
                leading = True
                print(f"LEADER {name}", flush=True)
                continue
        index, entry = client.kv.get(key, index=index, wait="2s")
        holder = (entry or {}).get("Session")
        if leading and holder != session:
            leading = False
        if not leading and holder is not None:
            print(f"FOLLOWER holder={holder}", flush=True)


if __name__ == "__main__":
    main()
