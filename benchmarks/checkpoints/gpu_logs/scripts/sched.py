"""Run jobs in priority order on K slots until a deadline; a job may wait for others (deps)."""
import json
import os
import subprocess
import sys
import time

spec = json.load(open(sys.argv[1]))
K, deadline = spec["slots"], time.time() + spec["seconds"]
jobs = spec["jobs"]  # [{"name", "cmd", "log", "after": [names], "min_s": seconds needed to be worth starting}]
t0 = time.time()
state = {j["name"]: "wait" for j in jobs}
running = {}


def log(msg):
    print(f"[sched {time.time() - t0:6.1f}s] {msg}", flush=True)


while True:
    for name, (p, j) in list(running.items()):
        rc = p.poll()
        if rc is not None:
            state[name] = "ok" if rc == 0 else f"rc={rc}"
            log(f"end {name}: {state[name]} ({time.time() - j['_start']:.0f}s)")
            del running[name]
    left = deadline - time.time()
    for j in jobs:
        if len(running) >= K:
            break
        if state[j["name"]] != "wait":
            continue
        deps = [state[a] for a in j.get("after", [])]
        if any(d == "wait" or d == "run" for d in deps):
            continue
        if left < j.get("min_s", 30):
            state[j["name"]] = "skipped (deadline)"
            log(f"skip {j['name']}: {left:.0f}s left")
            continue
        j["_start"] = time.time()
        p = subprocess.Popen(["timeout", str(int(left)), "bash", "-c", j["cmd"]],
                             stdout=open(j["log"], "w"), stderr=subprocess.STDOUT)
        running[j["name"]] = (p, j)
        state[j["name"]] = "run"
        log(f"start {j['name']} (timeout {left:.0f}s)")
    if not running and all(s != "wait" for s in state.values()):
        break
    if not running and all(s == "wait" for s in state.values() if s == "wait") and \
            all(any(state[a] not in ("ok",) and state[a] not in ("wait", "run") for a in j.get("after", []))
                for j in jobs if state[j["name"]] == "wait"):
        for j in jobs:
            if state[j["name"]] == "wait":
                state[j["name"]] = "skipped (dependency failed)"
        break
    time.sleep(0.5)
log("states: " + json.dumps(state))
