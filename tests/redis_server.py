"""Start a real ``redis-server`` (Debian's package; .ci/run installs it) for a test, and stop it.

It listens on 127.0.0.1 and a free port, keeps nothing on disk, is ready once it answers
``PING``, and is killed by its PID. ``password`` starts it with ``requirepass``.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType

import pytest

from tests.live import free_port


class RedisServer:
    """One redis-server process; ``url`` reaches it (with the password, if any)."""

    def __init__(
        self,
        tmp_path: Path,
        *,
        password: str | None = None,
        port: int | None = None,
        extra: list[str] | None = None,
        tls: bool = False,
    ) -> None:
        self.tmp_path = tmp_path
        self.password = password
        self.port = port or free_port()
        self.extra = extra or []
        self.tls = tls
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        if self.tls:  # the server's certificate checked against the test's own CA
            return f"rediss://{auth}127.0.0.1:{self.port}/0?ssl_ca_certs={self.tmp_path / 'ca.pem'}"
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 20) -> RedisServer:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.skip("redis-server is not installed (apt-get install redis-server)")
        args = [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                "--dir", str(self.tmp_path)]  # fmt: skip
        if self.password:
            args += ["--requirepass", self.password]
        if self.tls:
            ca, cert, key = certificates(self.tmp_path)
            args[1:3] = ["--port", "0", "--tls-port", str(self.port)]
            args += ["--tls-cert-file", str(cert), "--tls-key-file", str(key), "--tls-ca-cert-file", str(ca),
                     "--tls-auth-clients", "no", "--tls-cluster", "yes"]  # fmt: skip
        args += self.extra
        log = (self.tmp_path / f"redis-{self.port}.log").open("wb")
        self.process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        import redis

        client = redis.Redis.from_url(self.url, socket_timeout=1, socket_connect_timeout=1)
        deadline = time.monotonic() + timeout
        while True:
            try:
                if client.ping():
                    client.close()
                    return self
            except redis.RedisError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("redis-server did not answer PING in time")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)
        self.process = None

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


class RedisCluster:
    """A Redis Cluster of ``size`` primaries (no replicas) on loopback, made the way its docs say:
    ``redis-server --cluster-enabled yes`` each, then ``redis-cli --cluster create``. Ready once
    every node reports ``cluster_state:ok``; ``url`` names the first node (any node will do)."""

    def __init__(self, tmp_path: Path, size: int = 3, *, tls: bool = False) -> None:
        self.tmp_path = tmp_path
        self.size = size
        self.tls = tls
        self.nodes: list[RedisServer] = []

    @property
    def url(self) -> str:
        return self.nodes[0].url

    def start(self, timeout: float = 30) -> RedisCluster:
        cli = shutil.which("redis-cli")
        if cli is None:
            pytest.skip("redis-cli is not installed (apt-get install redis-tools)")
        for _ in range(self.size):
            # The cluster bus listens on the port + 10000: both must be free.
            port = free_port()
            while port > 55000 or not _is_free(port + 10000):
                port = free_port()
            cluster = ["--cluster-enabled", "yes", "--cluster-config-file", f"nodes-{port}.conf",
                       "--cluster-node-timeout", "5000"]  # fmt: skip
            node = RedisServer(self.tmp_path, port=port, extra=cluster, tls=self.tls)
            self.nodes.append(node.start(timeout))
        addresses = [f"127.0.0.1:{node.port}" for node in self.nodes]
        tls = ["--tls", "--cacert", str(self.tmp_path / "ca.pem")] if self.tls else []
        create = [cli, *tls, "--cluster", "create", *addresses, "--cluster-replicas", "0", "--cluster-yes"]
        subprocess.run(create, check=True, capture_output=True, timeout=timeout)
        import redis

        deadline = time.monotonic() + timeout
        for node in self.nodes:
            client = redis.Redis.from_url(node.url, socket_timeout=1)
            while client.cluster("info").get("cluster_state") != "ok":
                if time.monotonic() > deadline:
                    raise RuntimeError("the cluster did not become ok in time")
                time.sleep(0.1)
            client.close()
        return self

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def __enter__(self) -> RedisCluster:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def _is_free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def certificates(folder: Path) -> tuple[Path, Path, Path]:
    """A CA, and a server certificate it signed for 127.0.0.1 with its key, as PEM files in
    ``folder`` (made once per folder)."""
    paths = (folder / "ca.pem", folder / "server.pem", folder / "server.key")
    if all(path.exists() for path in paths):
        return paths
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    since, until = now - datetime.timedelta(hours=1), now + datetime.timedelta(days=1)

    def name(text: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, text)])

    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder(
            subject_name=name("flask-sse-run tests CA"),
            issuer_name=name("flask-sse-run tests CA"),
            public_key=ca_key.public_key(),
            serial_number=x509.random_serial_number(),
            not_valid_before=since,
            not_valid_after=until,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    server = (
        x509.CertificateBuilder(
            subject_name=name("127.0.0.1"),
            issuer_name=ca.subject,
            public_key=key.public_key(),
            serial_number=x509.random_serial_number(),
            not_valid_before=since,
            not_valid_after=until,
        )
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(server.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return paths
