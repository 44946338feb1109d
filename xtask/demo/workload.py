#!/usr/bin/env python3
"""A demo workload: asks Tessera's Workload API for a credential, then calls the secret store.

The credential is bound to this process (bind: process), so the same process that asked for it
must make the call. Run inside a workload's cgroup; see README.md "Getting a credential".
"""
import argparse
import http.client
import json
import socket
import sys


class UnixHTTPConnection(http.client.HTTPConnection):
    """HTTP/1.1 over the Workload API's unix socket."""

    def __init__(self, path):
        super().__init__("localhost")
        self.unix_path = path

    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(self.unix_path)


def get_credential(api_socket, audience, task, ttl):
    conn = UnixHTTPConnection(api_socket)
    body = json.dumps({"audience": audience, "task": task, "ttl_seconds": ttl})
    conn.request("POST", "/v1/credentials", body=body,
                 headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    answer = json.loads(resp.read() or b"{}")
    return resp.status, answer


def call(host, port, token):
    """Connects to the endpoint and sends one request; reports what happened."""
    try:
        sock = socket.create_connection((host, port), timeout=5)
    except PermissionError as err:
        return "denied", f"connect() failed: {err.strerror} (errno {err.errno})"
    except OSError as err:
        return "error", f"connect() failed: {err}"
    with sock:
        auth = f"Authorization: Bearer {token}\r\n" if token else ""
        sock.sendall(f"GET /v1/secret/db HTTP/1.0\r\nHost: vault\r\n{auth}\r\n".encode())
        status_line = sock.recv(4096).decode(errors="replace").split("\r\n", 1)[0]
    return "connected", status_line


def say(**fields):
    print(json.dumps(fields), flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--api", required=True, help="Workload API socket")
    p.add_argument("--endpoint", required=True, help="HOST:PORT to call")
    p.add_argument("--audience", help="ask for a credential for this endpoint first")
    p.add_argument("--task", default="demo-task")
    p.add_argument("--ttl", type=int, default=60)
    p.add_argument("--again-on-stdin", action="store_true",
                   help="after the first call, call again each time a line arrives on stdin")
    args = p.parse_args()
    host, port = args.endpoint.rsplit(":", 1)

    token = None
    if args.audience:
        status, answer = get_credential(args.api, args.audience, args.task, args.ttl)
        if status == 200:
            token = answer["token"]
            say(step="credential", status=status, jti=answer["jti"],
                spiffe_id=answer["spiffe_id"], expires_at=answer["expires_at"])
        else:
            say(step="credential", status=status, refused=answer)

    outcome, detail = call(host, int(port), token)
    say(step="call", outcome=outcome, detail=detail)
    if args.again_on_stdin:
        for _ in sys.stdin:
            outcome, detail = call(host, int(port), token)
            say(step="call", outcome=outcome, detail=detail)


if __name__ == "__main__":
    main()
