"""Bearer token and TLS, with a self-signed certificate made here; secrets only from the environment."""
from __future__ import annotations

import datetime
import ipaddress

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from cluster.serving.client import OutriderClient
from cluster.config import ConfigError, parse_config

TOKEN = "test-token-5b1c"


def _self_signed(tmp_path):
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    (tmp_path / "tls.crt").write_bytes(cert_pem)
    (tmp_path / "tls.key").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                         serialization.NoEncryption()))
    return cert_pem


@pytest.fixture(scope="module")
def secured(serve_tiny, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tls")
    cert = _self_signed(tmp)
    mp = pytest.MonkeyPatch()
    mp.setenv("OUTRIDER_TEST_TOKEN", TOKEN)
    server, client = serve_tiny({"server.auth_token_env": "OUTRIDER_TEST_TOKEN", "metrics.enabled": False,
                                 "server.tls": {"cert_file": str(tmp / "tls.crt"), "key_file": str(tmp / "tls.key")}},
                                token=TOKEN, root_certificates=cert)
    yield server, client, cert
    mp.undo()
    client.close()
    server.stop(grace_s=1)


def test_token_and_tls_accept_the_right_client(secured):
    _, client, _ = secured
    text, final = client.generate_text("def main():\n    return", max_new_tokens=8)
    assert final.usage.completion_tokens == 8


@pytest.mark.parametrize("token", [None, "wrong", TOKEN + "x"])
def test_missing_or_wrong_token_is_unauthenticated(secured, token):
    server, _, cert = secured
    with OutriderClient(f"127.0.0.1:{server.port}", token=token, root_certificates=cert) as c:
        for call in (lambda: c.generate_text("x", max_new_tokens=2), c.info, lambda: c.abort("r")):
            with pytest.raises(grpc.RpcError) as e:
                call()
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert c.health() == "SERVING"  # probes need no token


def test_plaintext_client_cannot_talk_to_a_tls_server(secured):
    server, _, _ = secured
    with OutriderClient(f"127.0.0.1:{server.port}", token=TOKEN) as c:
        with pytest.raises(grpc.RpcError) as e:
            c.info()
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE


def test_secrets_are_never_yaml_literals():
    base = {"models": {"target": {"path": "t"}, "draft": {"path": "d"}}}
    with pytest.raises(ConfigError, match="server.auth_token: unknown key"):
        parse_config({**base, "server": {"auth_token": "literal-secret"}})
    assert parse_config(base).server.host == "127.0.0.1"


def test_missing_token_variable_fails_at_start(monkeypatch):
    monkeypatch.delenv("OUTRIDER_NOT_SET", raising=False)
    cfg = parse_config({"models": {"target": {"path": "t"}, "draft": {"path": "d"}},
                        "server": {"auth_token_env": "OUTRIDER_NOT_SET"}})
    with pytest.raises(ConfigError, match="OUTRIDER_NOT_SET"):
        cfg.server.auth_token()


def test_http_api_uses_the_same_tls_and_token(secured, tmp_path):
    import json
    import ssl
    import urllib.error
    import urllib.request

    server, _, cert = secured
    (tmp_path / "ca.pem").write_bytes(cert)
    ctx = ssl.create_default_context(cafile=str(tmp_path / "ca.pem"))
    url = f"https://127.0.0.1:{server.http_port}/v1/completions"
    body = json.dumps({"prompt": "def main():", "max_tokens": 4, "temperature": 0}).encode()

    def post(token):
        req = urllib.request.Request(url, body, {"Content-Type": "application/json",
                                                 **({"Authorization": f"Bearer {token}"} if token else {})})
        return urllib.request.urlopen(req, context=ctx, timeout=30)

    assert json.loads(post(TOKEN).read())["usage"]["completion_tokens"] == 4
    with pytest.raises(urllib.error.HTTPError) as e:
        post("wrong")
    assert e.value.code == 401
    with pytest.raises((urllib.error.URLError, ConnectionError)):  # plain HTTP on the TLS port: no answer
        urllib.request.urlopen(url.replace("https", "http"), body, timeout=30)
