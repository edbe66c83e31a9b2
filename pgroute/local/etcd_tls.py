"""Certificates for a local etcd served over TLS, for the tests of pgroute's etcd TLS.

Owns `EtcdTls` (the files a TLS member and its clients use) and `make_etcd_tls`,
which writes a throwaway CA, a server certificate for 127.0.0.1/localhost and a
client certificate signed by it, with the ``openssl`` command line tool (present
wherever PostgreSQL's own TLS tests run; the ``cryptography`` package is not a
dependency of pgroute).

Invariant: every key and certificate lives in the directory given, valid for two
days; nothing is installed in the system's trust store.
"""

from __future__ import annotations

import shutil
import ssl
import subprocess
from dataclasses import dataclass
from pathlib import Path

from pgroute.errors import LocalClusterError

_DAYS = "2"
_KEY = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")


@dataclass(frozen=True, slots=True)
class EtcdTls:
    """Files of a TLS etcd: its CA, server pair and a client pair. ``client_auth``:
    the members require a client certificate signed by the CA (mutual TLS)."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    client_auth: bool = False

    def server_flags(self) -> list[str]:
        flags = [
            f"--cert-file={self.server_cert}",
            f"--key-file={self.server_key}",
            f"--trusted-ca-file={self.ca}",
        ]
        if self.client_auth:
            flags.append("--client-cert-auth")
        return flags

    def client_context(self) -> ssl.SSLContext:
        """What a helper of this module needs to talk to the members."""
        context = ssl.create_default_context(cafile=str(self.ca))
        context.load_cert_chain(str(self.client_cert), str(self.client_key))
        return context


def _openssl(*args: str, cwd: Path) -> None:
    binary = shutil.which("openssl")
    if binary is None:
        raise LocalClusterError("openssl is not installed: apt-get install openssl")
    done = subprocess.run([binary, *args], cwd=cwd, capture_output=True, text=True)
    if done.returncode != 0:
        raise LocalClusterError(f"openssl {args[0]} failed: {done.stderr.strip()[-500:]}")


def make_etcd_tls(directory: Path | str, *, client_auth: bool = False) -> EtcdTls:
    """A CA, a server certificate (127.0.0.1, localhost) and a client certificate
    without a common name under ``directory``. (etcd's JSON gateway refuses a client
    certificate with a common name once authentication is on: `client_pair` makes one
    to show that.)"""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    _openssl(
        "req", "-x509", *_KEY, "-keyout", "ca.key", "-out", "ca.crt", "-days", _DAYS,
        "-subj", "/CN=pgroute test etcd CA",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        cwd=d,
    )  # fmt: skip
    _sign(d, "server", "/CN=127.0.0.1", "serverAuth,clientAuth", "IP:127.0.0.1,DNS:localhost")
    _sign(d, "client", "/O=pgroute", "clientAuth", "DNS:pgroute-client")
    return EtcdTls(d / "ca.crt", d / "server.crt", d / "server.key", d / "client.crt", d / "client.key", client_auth)


def client_pair(tls: EtcdTls, name: str, common_name: str) -> tuple[Path, Path]:
    """Another client certificate and key signed by ``tls``'s CA, with a common name."""
    d = tls.ca.parent
    _sign(d, name, f"/CN={common_name}", "clientAuth", f"DNS:{common_name}")
    return d / f"{name}.crt", d / f"{name}.key"


def _sign(d: Path, name: str, subject: str, usage: str, san: str) -> None:
    (d / f"{name}.ext").write_text(
        f"subjectAltName={san}\nextendedKeyUsage={usage}\nkeyUsage=critical,digitalSignature\n"
        "basicConstraints=critical,CA:FALSE\nauthorityKeyIdentifier=keyid\nsubjectKeyIdentifier=hash\n"
    )
    _openssl("req", *_KEY, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", subject, cwd=d)
    _openssl(
        "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
        "-out", f"{name}.crt", "-days", _DAYS, "-extfile", f"{name}.ext",
        cwd=d,
    )  # fmt: skip
