from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
import requests
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from flask import Flask, g
from flask.testing import FlaskClient

from flask_sse_run import ConfigurationError, SSERun
from tests.apps import create_app
from tests.live import gunicorn

TOKEN = "static-token-0123456789"
OTHER_TOKEN = "another-token-9876543210"
SECRET = "a-jwt-secret-that-is-32-bytes-ok"
MISSING = "authentication required: send 'Authorization: Bearer <token>'"


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def make_jwt(key: Any = SECRET, algorithm: str = "HS256", exp: float | None = 60, **claims: Any) -> str:
    if exp is not None:
        claims["exp"] = int(time.time() + exp)
    return jwt.encode({"sub": "alice", **claims}, key, algorithm=algorithm)


def app_with(**config: Any) -> Flask:
    """An app with auth configured, a protected ``secret``, a ``claims`` echo and a public ``open``."""
    app = Flask(__name__)
    app.config.update(config)
    sse = SSERun(app)

    @sse.function
    def secret() -> Iterator[str]:
        yield "the secret"

    @sse.function
    def claims() -> Iterator[Any]:
        yield g.get("sse_run_claims")

    @sse.function(public=True)
    def open() -> Iterator[str]:
        yield "for everyone"

    @sse.function
    def fails() -> Iterator[str]:
        raise RuntimeError("boom")
        yield "never"

    return app


@pytest.fixture
def static_client() -> FlaskClient:
    return app_with(SSE_RUN_AUTH_TOKENS=[TOKEN, OTHER_TOKEN]).test_client()


@pytest.fixture
def jwt_client() -> FlaskClient:
    return app_with(SSE_RUN_JWT_KEY=SECRET).test_client()


def assert_401(response: Any, message: str, *, invalid_token: bool) -> None:
    assert response.status_code == 401
    assert response.content_type == "application/json"
    assert response.get_json() == {"error": message}
    challenge = response.headers["WWW-Authenticate"]
    if invalid_token:
        assert challenge == f'Bearer error="invalid_token", error_description="{message}"'
    else:
        assert challenge == "Bearer"


# --- configuration ---------------------------------------------------------------------------


def test_auth_is_off_by_default() -> None:
    response = create_app().test_client().post("/count", json={"n": 1})
    assert response.status_code == 200
    assert create_app().extensions["sse_run"].auth is None


RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
PRIVATE_PEM = RSA_KEY.private_bytes(
    serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
).decode()
PUBLIC_PEM = (
    RSA_KEY.public_key()
    .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    .decode()
)


@pytest.mark.parametrize(
    ("config", "fragment"),
    [
        ({"SSE_RUN_AUTH_TOKENS": []}, "SSE_RUN_AUTH_TOKENS: an empty list would let nobody in"),
        ({"SSE_RUN_AUTH_TOKENS": ["short"]}, "token 0 is shorter than 16 characters"),
        ({"SSE_RUN_AUTH_TOKENS": [TOKEN, "has spaces in it, 0123"]}, "token 1 holds characters"),
        ({"SSE_RUN_AUTH_TOKENS": TOKEN}, "SSE_RUN_AUTH_TOKENS: must be a list of strings, not a string"),
        ({"SSE_RUN_AUTH_TOKENS": [7]}, "SSE_RUN_AUTH_TOKENS.0"),
        ({"SSE_RUN_JWT_KEY": SECRET, "SSE_RUN_JWT_ALGORITHMS": ["none"]}, "must not hold 'none'"),
        ({"SSE_RUN_JWT_KEY": SECRET, "SSE_RUN_JWT_ALGORITHMS": ["HS256", "NONE"]}, "must not hold 'none'"),
        ({"SSE_RUN_JWT_KEY": SECRET, "SSE_RUN_JWT_ALGORITHMS": []}, "at least one algorithm"),
        ({"SSE_RUN_JWT_KEY": SECRET, "SSE_RUN_JWT_ALGORITHMS": ["HS999"]}, "'HS999' is not available"),
        ({"SSE_RUN_JWT_KEY": PUBLIC_PEM, "SSE_RUN_JWT_ALGORITHMS": ["RS256", "HS256"]}, "mixes HMAC"),
        ({"SSE_RUN_JWT_KEY": "too-short"}, "too weak for HS256"),
        ({"SSE_RUN_JWT_KEY": SECRET, "SSE_RUN_JWT_ALGORITHMS": ["HS512"]}, "too weak for HS512"),
        ({"SSE_RUN_JWT_KEY": PUBLIC_PEM}, "not a key for HS256"),
        ({"SSE_RUN_JWT_KEY": SECRET, "SSE_RUN_JWT_ALGORITHMS": ["RS256"]}, "not a key for RS256"),
        ({"SSE_RUN_JWT_KEY": PRIVATE_PEM, "SSE_RUN_JWT_ALGORITHMS": ["RS256"]}, "is a private key"),
        ({"SSE_RUN_JWT_AUDIENCE": "api"}, "SSE_RUN_JWT_AUDIENCE is set but SSE_RUN_JWT_KEY is not"),
        ({"SSE_RUN_JWT_KEY": SECRET, "SSE_RUN_JWT_ALGORITHMS": "HS256"}, "SSE_RUN_JWT_ALGORITHMS"),
    ],
    ids=lambda value: None if isinstance(value, dict) else value[:30],
)
def test_bad_auth_configuration_fails_at_start_up(config: dict[str, Any], fragment: str) -> None:
    app = Flask(__name__)
    app.config.update(config)
    with pytest.raises(ConfigurationError, match=fragment) as info:
        SSERun(app)
    # The message names the problem, never the secret.
    for secret in (TOKEN, SECRET, PRIVATE_PEM, "has spaces in it"):
        assert secret not in str(info.value)


def test_good_auth_configuration_is_read() -> None:
    app = Flask(__name__)
    app.config.update(
        SSE_RUN_AUTH_TOKENS=[TOKEN],
        SSE_RUN_JWT_KEY=PUBLIC_PEM,
        SSE_RUN_JWT_ALGORITHMS=["RS256"],
        SSE_RUN_JWT_AUDIENCE="api",
    )
    SSERun(app)
    settings = app.extensions["sse_run"].settings
    assert settings.auth_tokens == (TOKEN,)
    assert settings.jwt_algorithms == ("RS256",)
    assert settings.auth_enabled


# --- static tokens -----------------------------------------------------------------------------


@pytest.mark.parametrize("token", [TOKEN, OTHER_TOKEN])
def test_every_configured_token_is_let_in(static_client: FlaskClient, token: str) -> None:
    response = static_client.post("/secret", headers=bearer(token))
    assert response.status_code == 200
    assert response.data == b"data: the secret\n\n"


def test_the_scheme_name_is_case_insensitive(static_client: FlaskClient) -> None:
    assert static_client.post("/secret", headers={"Authorization": f"bearer {TOKEN}"}).status_code == 200


def test_no_credentials_is_401_with_a_bare_bearer_challenge(static_client: FlaskClient) -> None:
    assert_401(static_client.post("/secret"), MISSING, invalid_token=False)


def test_another_scheme_is_401_like_no_credentials(static_client: FlaskClient) -> None:
    basic = "Basic " + base64.b64encode(b"user:" + TOKEN.encode()).decode()
    assert_401(static_client.post("/secret", headers={"Authorization": basic}), MISSING, invalid_token=False)


def test_a_wrong_token_is_401_invalid_token(static_client: FlaskClient) -> None:
    response = static_client.post("/secret", headers=bearer(TOKEN + "x"))
    assert_401(response, "the bearer token is invalid", invalid_token=True)


@pytest.mark.parametrize("header", ["Bearer", "Bearer ", "Bearer a b", "Bearer t\u00e9st-token-0123456789"])
def test_a_malformed_bearer_header_is_401(static_client: FlaskClient, header: str) -> None:
    response = static_client.post("/secret", headers={"Authorization": header})
    assert_401(response, "the bearer token is malformed", invalid_token=True)


def test_every_token_is_compared_in_constant_time(
    static_client: FlaskClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", counting)
    # The first token matches, yet the second is compared too: no early exit.
    assert static_client.post("/secret", headers=bearer(TOKEN)).status_code == 200
    assert len(calls) == 2
    # Digests of equal length are compared, never the raw tokens.
    assert all(len(a) == len(b) == 32 for a, b in calls)


def test_a_public_function_needs_no_token(static_client: FlaskClient) -> None:
    response = static_client.post("/open")
    assert response.status_code == 200
    assert response.data == b"data: for everyone\n\n"


def test_unknown_functions_and_wrong_methods_are_answered_before_auth(static_client: FlaskClient) -> None:
    assert static_client.post("/nope").status_code == 404
    response = static_client.get("/secret")
    assert response.status_code == 405 and response.headers["Allow"] == "OPTIONS, POST"


def test_auth_is_checked_before_the_body_is_read() -> None:
    client = app_with(SSE_RUN_AUTH_TOKENS=[TOKEN], SSE_RUN_MAX_BODY=10).test_client()
    # Neither the invalid JSON nor the size is looked at for a stranger.
    response = client.post("/secret", data=b"{" * 100, content_type="application/json")
    assert_401(response, MISSING, invalid_token=False)
    assert client.post("/secret", data=b"{" * 100, headers=bearer(TOKEN)).status_code == 413


def test_static_tokens_leave_no_claims(static_client: FlaskClient) -> None:
    assert static_client.post("/claims", headers=bearer(TOKEN)).data == b"data: null\n\n"


# --- JWT -------------------------------------------------------------------------------------


def test_a_valid_jwt_is_let_in_and_its_claims_reach_the_function(jwt_client: FlaskClient) -> None:
    response = jwt_client.post("/claims", headers=bearer(make_jwt(role="admin")))
    assert response.status_code == 200
    claims = json.loads(response.data.decode().removeprefix("data: "))
    assert claims["sub"] == "alice" and claims["role"] == "admin"


def test_an_expired_jwt_is_401_and_says_so(jwt_client: FlaskClient) -> None:
    response = jwt_client.post("/secret", headers=bearer(make_jwt(exp=-5)))
    assert_401(response, "the bearer token has expired", invalid_token=True)


@pytest.mark.parametrize(
    "token",
    [
        pytest.param(make_jwt(exp=None), id="no-exp"),
        pytest.param(make_jwt(key="another-secret-that-is-32-bytes!"), id="other-key"),
        pytest.param(make_jwt(algorithm="HS512", key=SECRET * 2), id="alg-not-allowed"),
        pytest.param(make_jwt(nbf=int(time.time()) + 600), id="not-yet-valid"),
        pytest.param(make_jwt(aud="someone-else"), id="unexpected-aud"),
        pytest.param(
            jwt.encode({"sub": "alice", "exp": int(time.time()) + 60}, None, algorithm="none"), id="alg-none"
        ),
        pytest.param("not.a.jwt", id="garbage"),
        pytest.param(make_jwt()[:-4], id="truncated-signature"),
    ],
)
def test_a_bad_jwt_is_401_invalid_token(jwt_client: FlaskClient, token: str) -> None:
    response = jwt_client.post("/secret", headers=bearer(token))
    assert_401(response, "the bearer token is invalid", invalid_token=True)


def test_the_audience_is_required_and_checked_when_configured() -> None:
    client = app_with(SSE_RUN_JWT_KEY=SECRET, SSE_RUN_JWT_AUDIENCE="my-api").test_client()
    assert client.post("/secret", headers=bearer(make_jwt(aud="my-api"))).status_code == 200
    assert client.post("/secret", headers=bearer(make_jwt(aud=["other", "my-api"]))).status_code == 200
    for token in (make_jwt(aud="other-api"), make_jwt()):
        assert_401(
            client.post("/secret", headers=bearer(token)), "the bearer token is invalid", invalid_token=True
        )


def test_rs256_tokens_are_verified_with_the_public_key() -> None:
    client = app_with(SSE_RUN_JWT_KEY=PUBLIC_PEM, SSE_RUN_JWT_ALGORITHMS=["RS256"]).test_client()
    good = make_jwt(key=PRIVATE_PEM, algorithm="RS256")
    assert client.post("/secret", headers=bearer(good)).status_code == 200

    # The algorithm-confusion attack: an HS256 token whose HMAC secret is the public key.
    def b64(data: bytes) -> bytes:
        return base64.urlsafe_b64encode(data).rstrip(b"=")

    claims = {"sub": "mallory", "exp": int(time.time()) + 60}
    signing_input = b64(b'{"alg":"HS256","typ":"JWT"}') + b"." + b64(json.dumps(claims).encode())
    signature = hmac.new(PUBLIC_PEM.encode(), signing_input, hashlib.sha256).digest()
    forged = (signing_input + b"." + b64(signature)).decode()
    assert_401(
        client.post("/secret", headers=bearer(forged)), "the bearer token is invalid", invalid_token=True
    )


def test_static_tokens_and_jwts_can_be_used_together() -> None:
    client = app_with(SSE_RUN_AUTH_TOKENS=[TOKEN], SSE_RUN_JWT_KEY=SECRET).test_client()
    assert client.post("/secret", headers=bearer(TOKEN)).status_code == 200
    assert client.post("/secret", headers=bearer(make_jwt())).status_code == 200
    assert client.post("/secret", headers=bearer(OTHER_TOKEN)).status_code == 401


# --- logs --------------------------------------------------------------------------------------


def test_tokens_never_appear_in_logs(caplog: pytest.LogCaptureFixture) -> None:
    app = app_with(SSE_RUN_AUTH_TOKENS=[TOKEN], SSE_RUN_JWT_KEY=SECRET)
    client = app.test_client()
    expired = make_jwt(exp=-5)
    good_jwt = make_jwt()
    with caplog.at_level(logging.DEBUG):
        for token in (TOKEN, TOKEN + "x", expired, good_jwt, "not.a.jwt"):
            client.post("/secret", headers=bearer(token))
            client.post("/fails", headers={**bearer(token), "Accept": "application/json"})
            client.post("/fails", headers=bearer(token))
    # Each refusal is logged with its reason, for operators; three bad tokens, three requests each.
    reasons = [r.getMessage().split("credentials refused ")[1] for r in caplog.records if "refused" in r.msg]
    assert sorted(set(reasons)) == ["(DecodeError)", "(ExpiredSignatureError)"] and len(reasons) == 9
    logged = "\n".join(caplog.text.splitlines() + [r.getMessage() for r in caplog.records])
    for secret in (TOKEN, expired, good_jwt, SECRET, TOKEN[:8]):
        assert secret not in logged


def test_tokens_never_appear_in_the_gunicorn_log(tmp_path: Path) -> None:
    config = {"SSE_RUN_AUTH_TOKENS": [TOKEN]}
    with gunicorn(tmp_path=tmp_path, config=config, env={"GUNICORN_LOGLEVEL": "debug"}) as server:
        for token in (TOKEN, OTHER_TOKEN):
            requests.post(f"{server.url}/count", json={"n": 1}, headers=bearer(token), timeout=5)
        log = server.log()
    assert "POST /count" in log  # the access log is on
    assert TOKEN not in log and OTHER_TOKEN not in log


# --- live, with real clients -------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    config = {"SSE_RUN_AUTH_TOKENS": [TOKEN], "SSE_RUN_JWT_KEY": SECRET}
    with gunicorn(tmp_path=tmp_path_factory.mktemp("auth"), config=config) as srv:
        yield srv


def test_requests_with_a_token_streams_and_without_one_gets_401(server: Any) -> None:
    for token in (TOKEN, make_jwt()):
        ok = requests.post(f"{server.url}/count", json={"n": 2}, headers=bearer(token), timeout=5)
        assert ok.status_code == 200
        assert ok.text == 'data: {"i":0}\n\ndata: {"i":1}\n\n'
    refused = requests.post(f"{server.url}/count", json={"n": 2}, timeout=5)
    assert refused.status_code == 401
    assert refused.headers["WWW-Authenticate"] == "Bearer"
    assert refused.headers["Content-Type"] == "application/json"
    assert refused.json() == {"error": MISSING}


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_with_a_token_streams_and_with_a_bad_one_gets_401(server: Any) -> None:
    def curl(*headers: str) -> subprocess.CompletedProcess[bytes]:
        args = ["curl", "-sS", "-N", "-i", "-X", "POST", f"{server.url}/count", "--data", '{"n": 2}']
        for header in ("Content-Type: application/json", *headers):
            args += ["-H", header]
        return subprocess.run(args, capture_output=True, timeout=10, check=True)

    ok = curl(f"Authorization: Bearer {TOKEN}").stdout
    assert ok.startswith(b"HTTP/1.1 200") and ok.endswith(b'data: {"i":0}\n\ndata: {"i":1}\n\n')
    bad = curl("Authorization: Bearer not-the-token-0123456789").stdout
    assert bad.startswith(b"HTTP/1.1 401")
    assert b'WWW-Authenticate: Bearer error="invalid_token"' in bad
    assert bad.endswith(b'{"error":"the bearer token is invalid"}')
