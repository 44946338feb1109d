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
  {"op": "exit"}
Network answers: {"result": "ok"} or {"result": "EPERM"} / {"result": "<errno name>"}.
"""
import errno
import http.client
import json
import os
import socket
import sys


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


def make_socket(cmd):
    try:
        with socket.socket(cmd["domain"], cmd["type"], cmd.get("proto", 0)):
            pass
        return {"result": "ok"}
    except OSError as err:
        return {"result": errname(err)}


def main():
    cgroup, api_socket = sys.argv[1], sys.argv[2]
    with open(os.path.join(cgroup, "cgroup.procs"), "w") as f:
        f.write(str(os.getpid()))
    print(json.dumps({"ready": os.getpid()}), flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        op = cmd["op"]
        if op == "exit":
            break
        if op == "token":
            body = {"audience": cmd["audience"]}
            for key in ("ttl_seconds", "task"):
                if key in cmd:
                    body[key] = cmd[key]
            out = api(api_socket, "POST", "/v1/credentials", json.dumps(body))
        elif op == "raw":
            out = api(api_socket, cmd["method"], cmd["path"], cmd.get("body"))
        elif op == "socket":
            out = make_socket(cmd)
        else:
            out = net(cmd)
        print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
