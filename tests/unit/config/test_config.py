from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline import config
from pipeline.errors import ConfigError, MissingSecretError


def load_text(tmp_path: Path, text: str, env: dict[str, str] | None = None) -> config.Config:
    p = tmp_path / "c.toml"
    p.write_text(text)
    return config.load(p, env or {})


def test_defaults_are_the_forwarder_plugins() -> None:
    c = config.load(None, {})
    assert (c.panel_url, c.scrubber_url, c.site_key, c.source_agent) == (
        "http://127.0.0.1:3015", "http://127.0.0.1:3017", "pk_test_thirdparty", "opencode")
    assert (c.sampling_rate, c.novelty_threshold, c.lru_size, c.max_messages) == (0.05, 0.7, 200, 25)
    assert c.breaker.failure_threshold == 3 and c.breaker.open_s == 300.0 and c.breaker.mode == "hold"
    assert c.kafka.bootstrap == "127.0.0.1:9092"


def test_defaults_of_the_safety_keys() -> None:
    c = config.load(None, {})
    assert (c.allow_unscrubbed, c.scrubbing_bypassed) == (False, False)
    assert (c.delivery.allow_insecure_http, c.scrub.allow_insecure_http) == (False, False)
    assert c.kafka.unscrubbed_retention_hours == 168.0
    assert all(h.password is None for h in c.hosts)


@pytest.mark.parametrize(("text", "key"), [
    ('samplingRate = "abc"', "samplingRate"),
    ("samplingRate = 1.5", "samplingRate"),
    ("noveltyThreshold = 2", "noveltyThreshold"),
    ("lruSize = 0", "lruSize"),
    ('maxMessages = "25"', "maxMessages"),
    ("bogus = 1", "bogus"),
    ("[kafka]\npartitions = -1", "kafka.partitions"),
    ("[kafka]\nnope = 1", "kafka.nope"),
    ('[breaker]\nmode = "maybe"', "breaker.mode"),
    ('panelUrl = "ftp://x"', "panelUrl"),
    ('[[hosts]]\nname = "a"\nmodel = "nomodel"', "hosts[0].model"),
    ('[[hosts]]\nname = "a"\n[[hosts]]\nname = "a"', "hosts[1].name"),
    ('[[hosts]]\nname = "a"\nbase_url = "http://10.1.2.3:4096"', "hosts[0].base_url"),
    ("samplingRateOverride = 1", "samplingRateOverride"),
    ("allowUnscrubbed = 1", "allowUnscrubbed"),
    ('scrubberUrl = ""', "scrubberUrl"),
    ('[kafka]\nunscrubbed_retention_hours = 200', "kafka.unscrubbed_retention_hours"),
    ('[delivery]\nallow_insecure_http = "yes"', "delivery.allow_insecure_http"),
    ('[[hosts]]\nname = "a"\npassword_env = "x-y"', "hosts[0].password_env"),
])
def test_invalid_values_name_the_key(tmp_path: Path, text: str, key: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_text(tmp_path, text)
    assert err.value.key == key
    assert key in str(err.value)


def test_sampling_rate_cap_and_fallbacks(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        assert load_text(tmp_path, "samplingRate = 0.5").sampling_rate == 0.25
    assert "capped" in caplog.text
    assert load_text(tmp_path, "samplingRate = 0.5\nsamplingRateOverride = true").sampling_rate == 0.5
    assert load_text(tmp_path, "samplingRate = -1").sampling_rate == 0.05
    assert load_text(tmp_path, "samplingRate = nan").sampling_rate == 0.05
    assert load_text(tmp_path, "samplingRate = 0.25").sampling_rate == 0.25


def test_environment_overrides(tmp_path: Path) -> None:
    env = {"PIPELINE_SAMPLING_RATE": "0.1", "PIPELINE_KAFKA__BOOTSTRAP": "k:1", "PIPELINE_LRU_SIZE": "500",
           "PIPELINE_BREAKER__MODE": "drop"}
    c = load_text(tmp_path, "samplingRate = 0.2", env)
    assert (c.sampling_rate, c.kafka.bootstrap, c.lru_size, c.breaker.mode) == (0.1, "k:1", 500, "drop")
    with pytest.raises(ConfigError) as err:
        config.load(None, {"PIPELINE_NOPE": "1"})
    assert "PIPELINE_NOPE" in str(err.value)
    with pytest.raises(ConfigError) as err:
        config.load(None, {"PIPELINE_KAFKA__PARTITIONS": "many"})
    assert err.value.key == "kafka.partitions"


def test_enable_disable_switches() -> None:
    assert config.load(None, {"PANEL_OPENCODE_DISABLED": "1"}).enabled is False
    assert config.load(None, {"PIPELINE_ENABLED": "false", "PANEL_OPENCODE_ENABLED": "1"}).enabled is True


def test_hosts_and_secrets_are_redacted(tmp_path: Path) -> None:
    c = load_text(tmp_path, '''
[[hosts]]
name = "a"
password = "hunter2-very-secret"
model = "anthropic/claude-sonnet-4"
[[hosts]]
name = "b"
base_url = "http://build-box:4096"
allow_insecure_http = true
site_key = "pk_live_other"
''', {"PANEL_INGEST_SECRET_PK_TEST_THIRDPARTY": "s3cr3t-hmac"})
    a, b = c.hosts
    assert a.base_url == "http://127.0.0.1:4096" and a.site_key == "pk_test_thirdparty"
    assert b.site_key == "pk_live_other"
    assert a.password is not None and a.password.reveal() == "hunter2-very-secret"
    var, secret = c.panel_secret("pk_test_thirdparty")
    assert var == "PANEL_INGEST_SECRET_PK_TEST_THIRDPARTY" and secret.reveal() == "s3cr3t-hmac"
    for text in (repr(c), str(c), repr(a), repr(secret)):
        assert "hunter2" not in text and "s3cr3t" not in text
    with pytest.raises(MissingSecretError) as err:
        c.panel_secret("pk_live_other")
    assert "PANEL_INGEST_SECRET_PK_LIVE_OTHER" in str(err.value)
    assert "s3cr3t" not in str(err.value)


def test_panel_secret_fallback_and_variable_name() -> None:
    assert config.panel_secret_variable("pk_test_thirdparty") == "PANEL_INGEST_SECRET_PK_TEST_THIRDPARTY"
    assert config.panel_secret_variable("a-b.c") == "PANEL_INGEST_SECRET_A_B_C"
    c = config.load(None, {"PANEL_INGEST_SECRET": "fallback"})
    assert c.panel_secret("x") == ("PANEL_INGEST_SECRET", config.Secret("fallback"))


def test_cli_exits_2_naming_the_key(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('samplingRate = "abc"\n')
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "--config", str(bad), "topics", "list"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "samplingRate" in proc.stderr


def test_cli_reports_missing_and_broken_files(tmp_path: Path) -> None:
    broken = tmp_path / "broken.toml"
    broken.write_text("samplingRate = = 1\n")
    for path in (broken, tmp_path / "missing.toml"):
        proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "--config", str(path), "topics", "list"],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2 and str(path) in proc.stderr


@pytest.mark.parametrize(("text", "key", "suggestion"), [
    ("samplingRat = 0.1", "samplingRat", "samplingRate"),
    ("[kafka]\nbootstrp = 'k:1'", "kafka.bootstrp", "bootstrap"),
    ("[kafak]\nbootstrap = 'k:1'", "kafak", "kafka"),
    ('[[hosts]]\nname = "a"\npasword = "x"', "hosts[0].pasword", "password"),
])
def test_unknown_keys_list_the_known_ones_and_suggest_one(tmp_path: Path, text: str, key: str,
                                                          suggestion: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_text(tmp_path, text)
    assert err.value.key == key
    assert f"did you mean {suggestion!r}?" in str(err.value)
    assert "known: " in str(err.value)


def test_the_unknown_key_error_lists_every_top_level_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_text(tmp_path, "zzz = 1")
    known = str(err.value).split("known: ", 1)[1]
    for name in [*config.TOP, "samplingRate", "kafka", "collector", "breaker", "hosts"]:
        assert name in known
    assert "did you mean" not in str(err.value)


def test_an_unknown_override_suggests_the_variable() -> None:
    with pytest.raises(ConfigError) as err:
        config.load(None, {"PIPELINE_SAMPLNG_RATE": "0.1"})
    assert err.value.key == "PIPELINE_SAMPLNG_RATE" and "did you mean 'PIPELINE_SAMPLING_RATE'?" in str(err.value)


def test_collector_and_breaker_settings_come_from_their_sections(tmp_path: Path) -> None:
    from pipeline.collector.settings import CollectorSettings
    from pipeline.delivery.breaker import BreakerSettings

    c = load_text(tmp_path, 'maxMessages = 7\n[collector]\nstate_dir = "~/state"\ndrop_event_types = ["lsp.*"]\n'
                            '[breaker]\nopen_s = 30\nmode = "drop"\n', {"PANEL_OPENCODE_DISABLED": "1"})
    settings = CollectorSettings.from_config(c, fetch_attempts=5)
    assert (settings.max_messages, settings.enabled, settings.fetch_attempts) == (7, False, 5)
    assert c.collector.state_dir == settings.state_dir == Path("~/state").expanduser()
    assert settings.drop_event_types == ("lsp.*",) and not settings.event_filter.keeps("lsp.x")
    breaker = BreakerSettings.from_section(c.breaker)
    assert (breaker.open_s, breaker.mode, breaker.probe_timeout_s) == (30, "drop", 60.0)
    assert load_text(tmp_path, '[collector]\nstate_dir = ""\n').collector.state_dir is None


def test_settings_built_in_code_obey_the_declared_rules() -> None:
    from pipeline.collector.settings import CollectorSettings
    from pipeline.delivery.breaker import BreakerSettings

    with pytest.raises(config.SettingError, match="buffer_max_records"):
        CollectorSettings(buffer_max_records=10_000_001)
    with pytest.raises(ValueError, match="maxMessages"):
        CollectorSettings(max_messages=0)
    with pytest.raises(ValueError, match="settle_initial_s"):
        CollectorSettings(settle_initial_s=-1)
    with pytest.raises(ValueError, match="failure_threshold"):
        config.BreakerConfig(failure_threshold=10_001)
    with pytest.raises(ValueError, match="failure_threshold"):
        BreakerSettings(failure_threshold=0)
    with pytest.raises(ValueError, match="retry_max_s"):
        config.ScrubConfig(retry_base_s=2, retry_max_s=1)


def test_retry_order_is_a_config_error_naming_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_text(tmp_path, "[delivery]\nretry_base_s = 5\nretry_max_s = 1\n")
    assert err.value.key == "delivery.retry_max_s" and "retry_base_s" in str(err.value)
