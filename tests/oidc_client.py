"""A relying party of Tessera's OIDC discovery, with PyJWT (pip install pyjwt[crypto]).

  oidc_client.py discover ISSUER CA_FILE AUDIENCE   (the token on stdin)
      fetches ISSUER/.well-known/openid-configuration over HTTPS trusting only CA_FILE, then
      the JWKS at its jwks_uri through PyJWKClient, and verifies the token (signature, aud,
      iss, exp); also checks that the wrong audience or issuer is refused and that the
      listener is not trusted without the test CA.
  oidc_client.py file JWKS_FILE ISSUER AUDIENCE     (the token on stdin)
      verifies the token with an exported JWKS file (PyJWKSet).
  oidc_client.py serial HOST PORT CA_FILE
      the serial number of the certificate the listener presents.

Prints one JSON object on stdout.
"""

import json
import socket
import ssl
import sys
import urllib.request

import jwt


def refused(fn):
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - any refusal is what is checked
        return type(e).__name__
    return None


def discover(issuer, ca_file, audience, token):
    ctx = ssl.create_default_context(cafile=ca_file)
    url = issuer.rstrip("/") + "/.well-known/openid-configuration"
    with urllib.request.urlopen(url, context=ctx, timeout=10) as r:
        config = json.load(r)
    client = jwt.PyJWKClient(config["jwks_uri"], ssl_context=ctx, cache_jwk_set=False)
    key = client.get_signing_key_from_jwt(token)
    algs = config["id_token_signing_alg_values_supported"]
    claims = jwt.decode(token, key.key, algorithms=algs, audience=audience, issuer=config["issuer"])
    untrusted = refused(
        lambda: urllib.request.urlopen(url, context=ssl.create_default_context(), timeout=10)
    )
    return {
        "config": config,
        "kid": key.key_id,
        "claims": claims,
        "keys": [k.key_id for k in client.get_jwk_set().keys],
        "wrong_audience": refused(
            lambda: jwt.decode(token, key.key, algorithms=algs, audience="other", issuer=issuer)
        ),
        "wrong_issuer": refused(
            lambda: jwt.decode(
                token, key.key, algorithms=algs, audience=audience, issuer="https://elsewhere"
            )
        ),
        "untrusted_ca": untrusted,
    }


def from_file(path, issuer, audience, token):
    with open(path) as f:
        jwks = jwt.PyJWKSet.from_json(f.read())
    kid = jwt.get_unverified_header(token)["kid"]
    key = next(k for k in jwks.keys if k.key_id == kid)
    claims = jwt.decode(token, key.key, algorithms=["ES256"], audience=audience, issuer=issuer)
    return {"kid": kid, "claims": claims}


def serial(host, port, ca_file):
    ctx = ssl.create_default_context(cafile=ca_file)
    with socket.create_connection((host, int(port)), timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname=host) as tls:
            return {"serial": tls.getpeercert()["serialNumber"]}


def main():
    mode = sys.argv[1]
    if mode == "discover":
        out = discover(sys.argv[2], sys.argv[3], sys.argv[4], sys.stdin.read().strip())
    elif mode == "file":
        out = from_file(sys.argv[2], sys.argv[3], sys.argv[4], sys.stdin.read().strip())
    elif mode == "serial":
        out = serial(sys.argv[2], sys.argv[3], sys.argv[4])
    else:
        raise SystemExit(f"unknown mode {mode}")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
