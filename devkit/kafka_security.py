"""What a secured local broker needs, made locally: a CA and a broker certificate (the
`cryptography` package), one SCRAM credential per pipeline role, and the client settings the
pipeline needs to reach it (a TOML snippet and an env file).

Everything lives in `<data dir>/security/` (private keys and passwords readable by the owner
only) and is made once: a restarted broker keeps its CA, certificate and credentials, as its
metadata log holds the SCRAM credentials it was formatted with.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from pipeline.config import Secret, kafka_password_variable
from pipeline.kafka.security import ADMIN, ROLES, KafkaAccess

USERNAME_TEMPLATE = "pipeline-{role}"
MECHANISM = "SCRAM-SHA-512"
CERT_DAYS = 365


@dataclass(frozen=True)
class SecurityFiles:
    """The secured broker's files under `root` (`<data dir>/security`)."""

    root: Path

    @property
    def ca_cert(self) -> Path:
        return self.root / "ca.pem"

    @property
    def ca_key(self) -> Path:
        return self.root / "ca.key"

    @property
    def broker_pem(self) -> Path:
        """The broker's key and certificate chain in one PEM file (Kafka's PEM key store)."""
        return self.root / "broker.pem"

    @property
    def credentials(self) -> Path:
        return self.root / "credentials.json"

    @property
    def client_toml(self) -> Path:
        return self.root / "client.toml"

    @property
    def client_env(self) -> Path:
        return self.root / "client.env"

    def passwords(self) -> dict[str, str]:
        """Role -> SCRAM password, plus `controller` (the KRaft controller listener's PLAIN password)."""
        return dict(json.loads(self.credentials.read_text()))

    def ensure(self, hosts: list[str]) -> None:
        """Make what is missing: the CA, the broker certificate for `hosts`, the credentials."""
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)
        if not self.credentials.exists():
            every = {role: secrets.token_urlsafe(24) for role in (*ROLES, "controller")}
            _write_private(self.credentials, json.dumps(every, indent=2))
        if not (self.ca_cert.exists() and self.ca_key.exists()):
            _make_ca(self.ca_cert, self.ca_key)
            self.broker_pem.unlink(missing_ok=True)
        if not self.broker_pem.exists():
            _make_broker_cert(self.ca_cert, self.ca_key, self.broker_pem, hosts)

    def access(self, bootstrap: str, role: str = ADMIN) -> KafkaAccess:
        """How a client of `role` reaches the secured broker (what `client.toml` + `client.env` say)."""
        return KafkaAccess(bootstrap=bootstrap, role=role, security_protocol="SASL_SSL", sasl_mechanism=MECHANISM,
                           username=USERNAME_TEMPLATE.format(role=role),
                           password=Secret(self.passwords()[role]),
                           password_variable=kafka_password_variable(role), ssl_cafile=str(self.ca_cert))

    def client_environment(self, bootstrap: str) -> dict[str, str]:
        """The environment a pipeline process needs for this broker: the `[kafka]` keys as
        `PIPELINE_KAFKA__*` overrides and every role's `KAFKA_SASL_PASSWORD_<ROLE>`."""
        env = {
            "PIPELINE_KAFKA__BOOTSTRAP": bootstrap,
            "PIPELINE_KAFKA__SECURITY_PROTOCOL": "SASL_SSL",
            "PIPELINE_KAFKA__SASL_MECHANISM": MECHANISM,
            "PIPELINE_KAFKA__SASL_USERNAME": USERNAME_TEMPLATE,
            "PIPELINE_KAFKA__SSL_CAFILE": str(self.ca_cert),
        }
        passwords = self.passwords()
        env.update({kafka_password_variable(role): passwords[role] for role in ROLES})
        return env

    def write_client_settings(self, bootstrap: str) -> None:
        """`client.toml` (the `[kafka]` keys, no secret in it) and `client.env` (the same as
        `PIPELINE_KAFKA__*` plus every role's password; owner-readable only)."""
        self.client_toml.write_text(
            "# the secured local broker; the passwords are in client.env (KAFKA_SASL_PASSWORD_<ROLE>)\n"
            "[kafka]\n"
            f'bootstrap = "{bootstrap}"\n'
            'security_protocol = "SASL_SSL"\n'
            f'sasl_mechanism = "{MECHANISM}"\n'
            f'sasl_username = "{USERNAME_TEMPLATE}"\n'
            f'ssl_cafile = "{self.ca_cert}"\n')
        lines = [f"{name}={value}" for name, value in self.client_environment(bootstrap).items()]
        _write_private(self.client_env, "\n".join(lines) + "\n")


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _make_ca(cert_path: Path, key_path: Path) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "opencode-panel-pipeline local CA")])
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(_now() - datetime.timedelta(minutes=5))
            .not_valid_after(_now() + datetime.timedelta(days=CERT_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False),
                           critical=True)
            .sign(key, hashes.SHA256()))
    _write_private(key_path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()).decode("ascii"))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _make_broker_cert(ca_cert_path: Path, ca_key_path: Path, out: Path, hosts: list[str]) -> None:
    """A certificate for the broker naming every host it is reached by (`localhost`, `127.0.0.1`,
    the configured listener host), signed by the local CA; key and chain in one PEM file."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    ca_cert = x509.load_pem_x509_certificate(ca_cert_path.read_bytes())
    ca_key = serialization.load_pem_private_key(ca_key_path.read_bytes(), password=None)
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    names: list[x509.GeneralName] = []
    for host in dict.fromkeys(["localhost", "127.0.0.1", *hosts]):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kafka-broker")]))
            .issuer_name(ca_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(_now() - datetime.timedelta(minutes=5))
            .not_valid_after(_now() + datetime.timedelta(days=CERT_DAYS))
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))  # type: ignore[arg-type]
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption()) + cert.public_bytes(serialization.Encoding.PEM) \
        + ca_cert.public_bytes(serialization.Encoding.PEM)
    _write_private(out, pem.decode("ascii"))
