"""Kafka client security: the `[kafka]` keys, the per-role password lookup, the one function that
makes every client's settings, and a guard that every Kafka client of the project takes them."""

from __future__ import annotations

import ast
import ssl
from pathlib import Path

import pytest

from pipeline import config as config_mod
from pipeline.config import ConfigError
from pipeline.kafka.security import (
    ROLES,
    KafkaAccess,
    client_settings,
    faust_settings,
    kafka_access,
)

REPO = Path(__file__).resolve().parents[3]
CLIENTS = {"AIOKafkaProducer", "AIOKafkaConsumer", "AIOKafkaAdminClient", "App"}
SETTINGS = {"client_settings", "faust_settings"}
SECURE = {"PIPELINE_KAFKA__SECURITY_PROTOCOL": "SASL_SSL", "PIPELINE_KAFKA__SASL_USERNAME": "pipeline-{role}",
          "PIPELINE_KAFKA__BOOTSTRAP": "kafka-1:9093,kafka-2:9093"}


def _load(env: dict[str, str]) -> config_mod.Config:
    return config_mod.load(None, env)


# ---------------------------------------------------------------- every client takes the settings


def _constructors(tree: ast.AST) -> list[tuple[ast.Call, ast.AST | None]]:
    """Every call that builds a Kafka client, with the function it is in."""
    found: list[tuple[ast.Call, ast.AST | None]] = []

    def visit(node: ast.AST, scope: ast.AST | None) -> None:
        for child in ast.iter_child_nodes(node):
            inner = child if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef) else scope
            if isinstance(child, ast.Call):
                f = child.func
                name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else None
                faust_app = isinstance(f, ast.Attribute) and f.attr == "App" and \
                    isinstance(f.value, ast.Name) and f.value.id == "faust"
                if name in CLIENTS - {"App"} or faust_app:
                    found.append((child, scope))
            visit(child, inner)

    visit(tree, None)
    return found


def _calls_settings(node: ast.AST) -> bool:
    return any(isinstance(n, ast.Call) and (getattr(n.func, "id", None) in SETTINGS
                                            or getattr(n.func, "attr", None) in SETTINGS)
               for n in ast.walk(node))


def _takes_settings(call: ast.Call, scope: ast.AST | None) -> bool:
    """The call spreads `client_settings(...)` / `faust_settings(...)` (directly, or through a name
    its function assigned from an expression that calls one) and names no bootstrap of its own."""
    if any(k.arg in ("bootstrap_servers", "broker", "broker_credentials", "security_protocol", "ssl_context",
                     "sasl_plain_password") for k in call.keywords):
        return False
    for k in call.keywords:
        if k.arg is not None:
            continue
        if _calls_settings(k.value):
            return True
        if isinstance(k.value, ast.Name) and scope is not None:
            for n in ast.walk(scope):
                targets = n.targets if isinstance(n, ast.Assign) else [n.target] if isinstance(n, ast.AnnAssign) \
                    else []
                value = getattr(n, "value", None)
                if value is not None and any(isinstance(t, ast.Name) and t.id == k.value.id for t in targets) \
                        and _calls_settings(value):
                    return True
    return False


def test_every_kafka_client_takes_the_one_settings_function() -> None:
    seen, wrong = 0, []
    for package in ("pipeline", "agents", "devkit", "bench"):
        for path in sorted((REPO / package).rglob("*.py")):
            tree = ast.parse(path.read_text(), str(path))
            for call, scope in _constructors(tree):
                seen += 1
                if not _takes_settings(call, scope):
                    wrong.append(f"{path.relative_to(REPO)}:{call.lineno}")
    assert seen >= 15, f"found only {seen} Kafka clients: the scan is broken"
    assert not wrong, ("Kafka clients not built from pipeline.kafka.security.client_settings (or faust_settings): "
                       + ", ".join(wrong))


def test_the_scan_catches_a_client_built_by_hand() -> None:
    tree = ast.parse("def f(b):\n    return AIOKafkaConsumer(bootstrap_servers=b, group_id=None)\n"
                     "def g(k):\n    s = client_settings(k)\n    return AIOKafkaProducer(**s)\n"
                     "def h(k):\n    return faust.App('x', broker='kafka://b')\n")
    verdicts = [_takes_settings(c, s) for c, s in _constructors(tree)]
    assert verdicts == [False, True, False]


# ---------------------------------------------------------------- the settings


def test_plaintext_by_default() -> None:
    access = kafka_access(_load({}), "ingest")
    assert client_settings(access) == {"bootstrap_servers": "127.0.0.1:9092", "security_protocol": "PLAINTEXT"}
    assert client_settings("h:1") == {"bootstrap_servers": "h:1", "security_protocol": "PLAINTEXT"}
    assert faust_settings("h:1,h:2") == {"broker": "kafka://h:1;kafka://h:2", "broker_credentials": None}


def test_sasl_ssl_per_role_user_and_password() -> None:
    cfg = _load({**SECURE, "KAFKA_SASL_PASSWORD": "shared", "KAFKA_SASL_PASSWORD_SIGN": "sign-secret"})
    sign, ingest = kafka_access(cfg, "sign"), kafka_access(cfg, "ingest")
    s = client_settings(sign)
    assert s["security_protocol"] == "SASL_SSL" and s["sasl_mechanism"] == "SCRAM-SHA-512"
    assert (s["sasl_plain_username"], s["sasl_plain_password"]) == ("pipeline-sign", "sign-secret")
    assert isinstance(s["ssl_context"], ssl.SSLContext) and s["ssl_context"].check_hostname
    assert client_settings(ingest)["sasl_plain_password"] == "shared"  # the fallback
    assert (sign.password_variable, ingest.password_variable) == ("KAFKA_SASL_PASSWORD_SIGN", "KAFKA_SASL_PASSWORD")
    assert sign.principal == "User:pipeline-sign"
    creds = faust_settings(sign)["broker_credentials"]
    assert (creds.username, creds.mechanism.value, creds.protocol.value) == ("pipeline-sign", "SCRAM-SHA-512",
                                                                              "SASL_SSL")


def test_no_password_in_reprs_descriptions_or_errors() -> None:
    cfg = _load({**SECURE, "KAFKA_SASL_PASSWORD_SIGN": "sign-secret"})
    sign = kafka_access(cfg, "sign")
    for text in (repr(sign), str(sign), sign.describe(), repr(cfg)):
        assert "sign-secret" not in text
    assert sign.describe() == "Kafka at kafka-1:9093,kafka-2:9093 (SASL_SSL, SCRAM-SHA-512 as pipeline-sign)"
    with pytest.raises(ConfigError) as missing:
        kafka_access(cfg, "deliver")
    assert "KAFKA_SASL_PASSWORD_DELIVER (or KAFKA_SASL_PASSWORD)" in str(missing.value)


def test_every_role_has_its_variable() -> None:
    assert {config_mod.kafka_password_variable(r) for r in ROLES} == {
        f"KAFKA_SASL_PASSWORD_{r.upper()}" for r in ROLES}
    with pytest.raises(ConfigError, match="unknown Kafka role"):
        kafka_access(_load({}), "nobody")


@pytest.mark.parametrize(("env", "key"), [
    ({"PIPELINE_KAFKA__SECURITY_PROTOCOL": "SASL_SSL"}, "kafka.sasl_username"),
    ({"PIPELINE_KAFKA__SECURITY_PROTOCOL": "TLS"}, "kafka.security_protocol"),
    ({"PIPELINE_KAFKA__SASL_MECHANISM": "GSSAPI"}, "kafka.sasl_mechanism"),
    ({"PIPELINE_KAFKA__SASL_USERNAME": "p-{stage}"}, "kafka.sasl_username"),
    ({"PIPELINE_KAFKA__SSL_CAFILE": "/ca.pem"}, "kafka.ssl_cafile"),  # TLS file without TLS
    ({"PIPELINE_KAFKA__SECURITY_PROTOCOL": "SSL", "PIPELINE_KAFKA__SSL_CERTFILE": "/c.pem"}, "kafka.ssl_keyfile"),
    ({**SECURE, "PIPELINE_KAFKA__SECURITY_PROTOCOL": "SASL_PLAINTEXT", "PIPELINE_KAFKA__SASL_MECHANISM": "PLAIN"},
     "kafka.sasl_mechanism"),
])
def test_security_keys_refused_together(env: dict[str, str], key: str) -> None:
    with pytest.raises(ConfigError) as refused:
        _load(env)
    assert refused.value.key == key


def test_tls_files_are_checked_at_start(tmp_path: Path) -> None:
    env = {**SECURE, "KAFKA_SASL_PASSWORD": "x", "PIPELINE_KAFKA__SSL_CAFILE": str(tmp_path / "missing.pem")}
    with pytest.raises(ConfigError, match=r"kafka\.ssl_cafile: no such file"):
        kafka_access(_load(env), "sign")
    (tmp_path / "junk.pem").write_text("not a certificate")
    env["PIPELINE_KAFKA__SSL_CAFILE"] = str(tmp_path / "junk.pem")
    with pytest.raises(ConfigError, match="holds no usable PEM certificate"):
        kafka_access(_load(env), "sign")


def test_plain_access_is_plain() -> None:
    access = KafkaAccess.plain("b:9092")
    assert (access.sasl, access.tls, access.principal) == (False, False, None)
