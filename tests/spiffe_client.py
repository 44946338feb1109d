#!/usr/bin/env python3
"""The real SPIFFE client (py-spiffe) against Tessera's Workload API, for tests/spiffe.rs.

Usage: spiffe_client.py CGROUP_DIR MODE AUDIENCE TRUST_DOMAIN PORT
Moves itself into CGROUP_DIR; configured only by SPIFFE_ENDPOINT_SOCKET (unix://...).
Prints one JSON object on stdout. MODE:
  full      fetch_jwt_svid, fetch_jwt_bundles, JwtSvid.parse_and_validate, validate_jwt_svid,
            JwtSource; then connects to 127.0.0.1:PORT
  refused   fetch_jwt_svid, expecting a refusal: {"error"}; then connects
  validate  validate_jwt_svid of the token read from stdin: {"validated"} or {"error"}
  no-header FetchJWTSVID through the generated stub without `workload.spiffe.io`: {"code",
            "details"}; then connects
  exit-race ROUNDS (a 6th argument) forked callers that send FetchJWTSVID and exit before,
            while or after the agent answers: {"rounds", "answered"}; then connects
  watch     stream_jwt_bundles: one line {"keys": [kid...]} for each bundle the stream sends,
            until stdin is closed (no connect)
"""
import json
import os
import socket
import sys


def connect(port):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(5)
    try:
        s.connect(("127.0.0.1", port))
        return "ok"
    except OSError as e:
        return f"errno:{e.errno}"
    finally:
        s.close()


def main():
    cgroup, mode, audience, trust_domain, port = sys.argv[1:6]
    port = int(port)
    with open(os.path.join(cgroup, "cgroup.procs"), "w") as f:
        f.write(str(os.getpid()))
    # LC_CTYPE is the interpreter's own (PEP 538 locale coercion), not the test's.
    out = {"env": sorted(k for k in os.environ if k != "LC_CTYPE")}
    from spiffe import JwtBundle, JwtSource, JwtSvid, TrustDomain, WorkloadApiClient

    if mode == "watch":
        def sent(bundles):
            bundle = bundles.get_bundle_for_trust_domain(TrustDomain(trust_domain))
            keys = sorted(bundle.jwt_authorities.keys()) if bundle else []
            print(json.dumps({"keys": keys}), flush=True)

        def failed(e):
            print(json.dumps({"error": str(e)}), flush=True)

        with WorkloadApiClient() as client:
            handle = client.stream_jwt_bundles(on_success=sent, on_error=failed)
            sys.stdin.read()
            handle.cancel()
        return
    if mode == "exit-race":
        import random
        import time
        rounds = int(sys.argv[6])
        answered = 0
        for i in range(rounds):
            r, w = os.pipe()
            pid = os.fork()
            if pid == 0:
                os.close(r)
                # grpc only in the child: a channel must not cross a fork.
                import grpc
                from spiffe._proto import workload_pb2, workload_pb2_grpc
                channel = grpc.insecure_channel(os.environ["SPIFFE_ENDPOINT_SOCKET"])
                stub = workload_pb2_grpc.SpiffeWorkloadAPIStub(channel)
                fut = stub.FetchJWTSVID.future(
                    workload_pb2.JWTSVIDRequest(audience=[audience]),
                    metadata=[("workload.spiffe.io", "true")], timeout=10)
                # From at once (the request may not even be out) to well after the answer.
                time.sleep(random.uniform(0, 0.06) if i % 4 else 0.0)
                os.write(w, b"1" if fut.done() and fut.exception() is None else b"0")
                os._exit(0)
            os.close(w)
            answered += os.read(r, 1) == b"1"
            os.close(r)
            os.waitpid(pid, 0)
        out["rounds"] = rounds
        out["answered"] = answered
    elif mode == "full":
        with WorkloadApiClient() as client:
            svid = client.fetch_jwt_svid(audience={audience})
            out["spiffe_id"] = str(svid.spiffe_id)
            out["token"] = svid.token
            bundles = client.fetch_jwt_bundles()
            bundle = bundles.get_bundle_for_trust_domain(TrustDomain(trust_domain))
            out["bundle_keys"] = sorted(bundle.jwt_authorities.keys()) if bundle else None
            parsed = JwtSvid.parse_and_validate(svid.token, bundle, {audience})
            out["parsed"] = str(parsed.spiffe_id)
            validated = client.validate_jwt_svid(svid.token, audience)
            out["validated"] = str(validated.spiffe_id)
            out["validated_audience"] = sorted(validated.audience)
            # The claims ValidateJWTSVID answers, as the proto carries them (py-spiffe keeps
            # only the SPIFFE ID).
            import grpc
            from spiffe._proto import workload_pb2, workload_pb2_grpc
            with grpc.insecure_channel(os.environ["SPIFFE_ENDPOINT_SOCKET"]) as channel:
                stub = workload_pb2_grpc.SpiffeWorkloadAPIStub(channel)
                answer = stub.ValidateJWTSVID(
                    workload_pb2.ValidateJWTSVIDRequest(audience=audience, svid=svid.token),
                    metadata=[("workload.spiffe.io", "true")], timeout=10)
                out["validated_claims"] = sorted(answer.claims.fields.keys())
            try:
                client.validate_jwt_svid(svid.token, "not-" + audience)
                out["wrong_audience"] = "accepted"
            except Exception as e:  # the error py-spiffe raises for a refused validation
                out["wrong_audience"] = str(e)
        with JwtSource() as source:
            from_source = source.fetch_svid(audience={audience})
            out["source_spiffe_id"] = str(from_source.spiffe_id)
            out["source_token"] = from_source.token
            b = source.get_bundle_for_trust_domain(TrustDomain(trust_domain))
            JwtSvid.parse_and_validate(from_source.token, b, {audience})
            out["source_validated"] = True
    elif mode == "refused":
        try:
            with WorkloadApiClient() as client:
                client.fetch_jwt_svid(audience={audience})
            out["error"] = None
        except Exception as e:
            out["error"] = str(e)
    elif mode == "validate":
        token = sys.stdin.read().strip()
        try:
            with WorkloadApiClient() as client:
                out["validated"] = str(client.validate_jwt_svid(token, audience).spiffe_id)
        except Exception as e:
            out["error"] = str(e)
    elif mode == "no-header":
        import grpc
        from spiffe._proto import workload_pb2, workload_pb2_grpc

        path = os.environ["SPIFFE_ENDPOINT_SOCKET"]
        with grpc.insecure_channel(path) as channel:
            stub = workload_pb2_grpc.SpiffeWorkloadAPIStub(channel)
            try:
                stub.FetchJWTSVID(workload_pb2.JWTSVIDRequest(audience=[audience]), timeout=10)
                out["code"] = "OK"
            except grpc.RpcError as e:
                out["code"] = e.code().name
                out["details"] = e.details()
            try:
                stub.FetchX509SVID(workload_pb2.X509SVIDRequest(), timeout=10,
                                   metadata=[("workload.spiffe.io", "true")]).next()
                out["x509"] = "OK"
            except grpc.RpcError as e:
                out["x509"] = e.code().name
                out["x509_details"] = e.details()
    out["pid"] = os.getpid()
    out["connect"] = connect(port)
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
