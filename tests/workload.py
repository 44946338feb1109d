#!/usr/bin/env python3
"""A scriptable workload for Tessera's integration tests.

Usage: workload.py CGROUP_DIR API_SOCKET
Moves itself into CGROUP_DIR, prints {"ready": pid}, then answers one JSON command per stdin
line with one JSON line on stdout. Commands:
  {"op": "token", "audience": A, "ttl_seconds": N?, "task": T?}   POST /v1/credentials
  {"op": "raw", "method": M, "path": P, "body": "..."}             any Workload API request
  {"op": "connect", "family": 4|6, "host": H, "port": P}           TCP connect
  {"op": "sendto", "family": 4|6, "host": H, "port": P}            UDP sendto, no connect
  {"op": "udp_connect", "family": 4|6, "host": H, "port": P}       UDP connect then send
                                  (with "send": false, connect only: no packet leaves)
  {"op": "socket", "domain": D, "type": T, "proto": P}            socket(D, T, P), then closed
  {"op": "setuid", "uid": U, "gid": G, "groups": [..]?}          setgroups, setresgid, setresuid
  {"op": "whoami"}                 {"pid", "ppid", "uid", "gid", "exe", "cgroup"} of this process
  {"op": "env", "name": N}         {"value": os.environ.get(N)} (never printed by the agent)
  {"op": "move", "cgroup": DIR}    write this pid into DIR/cgroup.procs
  {"op": "fork"}                   fork a child that answers commands too: {"child": pid}
  {"op": "child", "pid": P, "cmd": {...}}  one command for that child, its answer
                                  ({"op": "exit"} ends the child and waits for it)
  {"op": "exec", "exe": PATH?, "argv0": A?}  execv PATH (default: this interpreter) running
                                  this script again with the same CGROUP_DIR and API_SOCKET;
                                  the new image (same pid) prints {"ready": pid} again
  {"op": "exit_race", "audience": A, "port": P, "rounds": N, "max_delay_us": D}
                                  N times: a child asks for a credential and exits after a delay
                                  (0..D µs, spread over the rounds) without reading the answer;
                                  then a successor is forked onto the child's pid (ns_last_pid,
                                  needs root) and connects to P:
                                  {"rounds", "reused", "results": {result: count}} of successors
  {"op": "ask_burst", "audience": A, "count": N}
                                  N credential requests back to back: {"statuses": {code: count},
                                  "retry_after": the first 429's Retry-After, "refusal": its body}
  {"op": "open", "proto": "tcp"|"udp", "family": 4|6, "host": H, "port": P}
                                  a connected socket kept open: {"result", "id", "port": its
                                  local port}
  {"op": "keep_writing", "id": N, "interval_ms": I?}  a thread sends one byte every I ms
                                  (default 2) until a send fails
  {"op": "conn_status", "id": N}  {"error": errno name or null, "failed_at", "now"}
                                  (CLOCK_MONOTONIC seconds), "writes"
  {"op": "exit"}
A process already in CGROUP_DIR (started there, or exec'd again) does not move itself.
Network answers: {"result": "ok"} or {"result": "EPERM"} / {"result": "<errno name>"}.
"""
import errno
import http.client
import json
import os
import socket
import sys
import threading
import time


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path):
        super().__init__("localhost", timeout=10)
        self.unix_path = path

    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(10)
        self.sock.connect(self.unix_path)


def api(sock_path, method, path, body=None):
    conn = UnixHTTPConnection(sock_path)
    headers = {"Content-Type": "application/json"} if body is not None else {}
    conn.request(method, path, body=body, headers=headers)
    resp = conn.getresponse()
    raw = resp.read()
    try:
        parsed = json.loads(raw) if raw else None
    except ValueError:
        parsed = raw.decode(errors="replace")
    return {"status": resp.status, "body": parsed}


def errname(err):
    return errno.errorcode.get(err.errno, str(err.errno)) if err.errno else str(err)


def family(cmd):
    return socket.AF_INET6 if cmd.get("family") == 6 else socket.AF_INET


def net(cmd):
    fam = family(cmd)
    addr = (cmd["host"], cmd["port"])
    op = cmd["op"]
    try:
        if op == "connect":
            with socket.socket(fam, socket.SOCK_STREAM) as s:
                s.settimeout(5)
                s.connect(addr)
        elif op == "sendto":
            with socket.socket(fam, socket.SOCK_DGRAM) as s:
                s.sendto(b"ping", addr)
        elif op == "udp_connect":
            with socket.socket(fam, socket.SOCK_DGRAM) as s:
                s.connect(addr)
                if cmd.get("send", True):
                    s.send(b"ping")
        return {"result": "ok"}
    except OSError as err:
        return {"result": errname(err)}


def flood(cmd):
    """`count` sendto() calls to one destination from one UDP socket, as fast as Python goes:
    returns how many ended in each result."""
    results = {}
    with socket.socket(family(cmd), socket.SOCK_DGRAM) as s:
        addr = (cmd["host"], cmd["port"])
        for _ in range(cmd["count"]):
            try:
                s.sendto(b"x", addr)
                key = "ok"
            except OSError as err:
                key = errname(err)
            results[key] = results.get(key, 0) + 1
    return {"results": results}


def ask_burst(cmd, api_socket):
    body = json.dumps({"audience": cmd["audience"], "ttl_seconds": 60})
    statuses, retry_after, refusal = {}, None, None
    for _ in range(cmd["count"]):
        conn = UnixHTTPConnection(api_socket)
        conn.request("POST", "/v1/credentials", body=body,
                     headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        raw = resp.read()
        statuses[str(resp.status)] = statuses.get(str(resp.status), 0) + 1
        if resp.status == 429 and refusal is None:
            retry_after = resp.getheader("Retry-After")
            refusal = json.loads(raw)
        conn.close()
    return {"statuses": statuses, "retry_after": retry_after, "refusal": refusal}


def exit_race(cmd, api_socket):
    request = json.dumps({"audience": cmd["audience"]}).encode()
    head = (
        "POST /v1/credentials HTTP/1.1\r\nHost: localhost\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {len(request)}\r\n\r\n"
    ).encode()
    rounds, max_delay = cmd["rounds"], cmd["max_delay_us"]
    reused, results = 0, {}
    codes = {0: "ok", 1: "EPERM", 2: "other"}
    for i in range(rounds):
        child = os.fork()
        if child == 0:
            try:
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.connect(api_socket)
                s.sendall(head + request)
                delay = max_delay * (i % 50) / 50 / 1e6
                if delay:
                    time.sleep(delay)
            finally:
                os._exit(0)
        os.waitpid(child, 0)
        # The next fork gets the child's pid, unless another process of the host forks first.
        with open("/proc/sys/kernel/ns_last_pid", "w") as f:
            f.write(str(child - 1))
        successor = os.fork()
        if successor == 0:
            if os.getpid() != child:
                os._exit(3)
            try:
                with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                    s.settimeout(2)
                    s.connect(("127.0.0.1", cmd["port"]))
                os._exit(0)
            except PermissionError:
                os._exit(1)
            except OSError:
                os._exit(2)
        _, status = os.waitpid(successor, 0)
        code = os.waitstatus_to_exitcode(status)
        if code == 3:
            continue
        reused += 1
        key = codes.get(code, "other")
        results[key] = results.get(key, 0) + 1
    return {"rounds": rounds, "reused": reused, "results": results}


def make_socket(cmd):
    try:
        with socket.socket(cmd["domain"], cmd["type"], cmd.get("proto", 0)):
            pass
        return {"result": "ok"}
    except OSError as err:
        return {"result": errname(err)}


def own_cgroup():
    """This process's cgroup v2 path, relative to the hierarchy root."""
    with open("/proc/self/cgroup") as f:
        for line in f:
            if line.startswith("0::"):
                return line[3:].strip()
    return None


def move(cgroup_dir):
    with open(os.path.join(cgroup_dir, "cgroup.procs"), "w") as f:
        f.write(str(os.getpid()))


def set_ids(cmd):
    try:
        os.setgroups(cmd.get("groups", []))
        os.setresgid(cmd["gid"], cmd["gid"], cmd["gid"])
        os.setresuid(cmd["uid"], cmd["uid"], cmd["uid"])
        return {"result": "ok", "uid": os.getuid(), "gid": os.getgid()}
    except OSError as err:
        return {"result": errname(err)}


# Children made by "fork": pid -> (command pipe, answer pipe).
CHILDREN = {}


def fork():
    cmd_r, cmd_w = os.pipe()
    ans_r, ans_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(cmd_w)
        os.close(ans_r)
        for (w, r) in CHILDREN.values():
            w.close()
            r.close()
        CHILDREN.clear()
        commands = os.fdopen(cmd_r, "r")
        answers = os.fdopen(ans_w, "w")
        try:
            serve(commands, answers)
        finally:
            os._exit(0)
    os.close(cmd_r)
    os.close(ans_w)
    CHILDREN[pid] = (os.fdopen(cmd_w, "w"), os.fdopen(ans_r, "r"))
    return {"child": pid}


def to_child(cmd):
    pid = cmd["pid"]
    if pid not in CHILDREN:
        return {"error": f"no child {pid}"}
    w, r = CHILDREN[pid]
    sub = cmd["cmd"]
    w.write(json.dumps(sub) + "\n")
    w.flush()
    if sub["op"] == "exit":
        w.close()
        r.close()
        del CHILDREN[pid]
        os.waitpid(pid, 0)
        return {"result": "ok"}
    line = r.readline()
    return json.loads(line) if line else {"error": f"child {pid} exited"}


# Sockets made by "open": id -> state.
OPEN = {}


def open_conn(cmd):
    kind = socket.SOCK_DGRAM if cmd.get("proto") == "udp" else socket.SOCK_STREAM
    s = socket.socket(family(cmd), kind)
    try:
        s.settimeout(5)
        s.connect((cmd["host"], cmd["port"]))
    except OSError as err:
        s.close()
        return {"result": errname(err)}
    n = len(OPEN) + 1
    OPEN[n] = {"sock": s, "error": None, "failed_at": None, "writes": 0}
    return {"result": "ok", "id": n, "port": s.getsockname()[1]}


def keep_writing(cmd):
    state = OPEN[cmd["id"]]
    interval = cmd.get("interval_ms", 2) / 1000.0

    def write():
        while True:
            try:
                state["sock"].send(b"x")
                state["writes"] += 1
            except OSError as err:
                state["failed_at"] = time.monotonic()
                state["error"] = errname(err)
                return
            time.sleep(interval)

    threading.Thread(target=write, daemon=True).start()
    return {"result": "ok"}


def conn_status(cmd):
    state = OPEN[cmd["id"]]
    return {
        "error": state["error"],
        "failed_at": state["failed_at"],
        "writes": state["writes"],
        "now": time.monotonic(),
    }


def dispatch(cmd, api_socket, cgroup):
    op = cmd["op"]
    if op == "token":
        body = {"audience": cmd["audience"]}
        for key in ("ttl_seconds", "task"):
            if key in cmd:
                body[key] = cmd[key]
        return api(api_socket, "POST", "/v1/credentials", json.dumps(body))
    if op == "raw":
        return api(api_socket, cmd["method"], cmd["path"], cmd.get("body"))
    if op == "socket":
        return make_socket(cmd)
    if op == "flood":
        return flood(cmd)
    if op == "exit_race":
        return exit_race(cmd, api_socket)
    if op == "ask_burst":
        return ask_burst(cmd, api_socket)
    if op == "setuid":
        return set_ids(cmd)
    if op == "whoami":
        return {
            "pid": os.getpid(),
            "ppid": os.getppid(),
            "uid": os.getuid(),
            "gid": os.getgid(),
            "exe": os.readlink("/proc/self/exe"),
            "cgroup": own_cgroup(),
        }
    if op == "env":
        return {"value": os.environ.get(cmd["name"])}
    if op == "move":
        try:
            move(cmd["cgroup"])
            return {"result": "ok"}
        except OSError as err:
            return {"result": errname(err)}
    if op == "open":
        return open_conn(cmd)
    if op == "keep_writing":
        return keep_writing(cmd)
    if op == "conn_status":
        return conn_status(cmd)
    if op == "fork":
        return fork()
    if op == "child":
        return to_child(cmd)
    if op == "exec":
        exe = cmd.get("exe") or sys.executable
        sys.stdout.flush()
        os.execv(exe, [cmd.get("argv0", exe), os.path.abspath(__file__), cgroup, api_socket])
    return net(cmd)


def serve(commands, answers):
    cgroup, api_socket = sys.argv[1], sys.argv[2]
    for line in commands:
        cmd = json.loads(line)
        if cmd["op"] == "exit":
            break
        answers.write(json.dumps(dispatch(cmd, api_socket, cgroup)) + "\n")
        answers.flush()


def main():
    cgroup = sys.argv[1]
    here = own_cgroup()
    if not (here and os.path.normpath(cgroup).endswith(here) and here != "/"):
        move(cgroup)
    print(json.dumps({"ready": os.getpid()}), flush=True)
    serve(sys.stdin, sys.stdout)


if __name__ == "__main__":
    main()
