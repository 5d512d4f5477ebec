"""The loader's safety rules: no unscrubbed traffic by accident, no credentials in URLs, no plain
http to another machine unless asked for, host passwords from the environment, a bounded
retention for unscrubbed copies, and a ConfigError (exit 2), never a traceback, for absurd input."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline import config
from pipeline.errors import ConfigError
from tests.fixtures import REPO

PASSWORD = "hunter2-very-secret"


def load_text(tmp_path: Path, text: str, env: dict[str, str] | None = None) -> config.Config:
    p = tmp_path / "c.toml"
    p.write_text(text, encoding="utf-8")
    return config.load(p, env or {})


def refused(tmp_path: Path, text: str, env: dict[str, str] | None = None) -> ConfigError:
    with pytest.raises(ConfigError) as err:
        load_text(tmp_path, text, env)
    return err.value


# ---------------------------------------------------------------- 1. allowUnscrubbed


def test_scrubbing_is_on_by_default() -> None:
    c = config.load(None, {})
    assert c.allow_unscrubbed is False and c.scrubbing_bypassed is False


def test_empty_scrubber_url_needs_allow_unscrubbed(tmp_path: Path) -> None:
    err = refused(tmp_path, 'scrubberUrl = ""\n')
    assert err.key == "scrubberUrl"
    assert "scrubberUrl" in str(err) and "allowUnscrubbed = true" in str(err) and "development" in str(err)
    c = load_text(tmp_path, 'scrubberUrl = ""\nallowUnscrubbed = true\n')
    assert c.scrubbing_bypassed and c.allow_unscrubbed


@pytest.mark.parametrize("allow", [{}, {"PIPELINE_ALLOW_UNSCRUBBED": "true"}])
@pytest.mark.parametrize("empty", ["", " "])
def test_empty_scrubber_url_from_the_environment_is_always_an_error(
        tmp_path: Path, allow: dict[str, str], empty: str) -> None:
    # an empty variable is an unfilled template, not a decision to send content unscrubbed
    err = refused(tmp_path, "allowUnscrubbed = true\n", {"PIPELINE_SCRUBBER_URL": empty, **allow})
    assert err.key == "scrubberUrl" and "PIPELINE_SCRUBBER_URL" in str(err)


def test_an_explicit_empty_string_from_the_environment_is_a_bypass_when_allowed() -> None:
    c = config.load(None, {"PIPELINE_SCRUBBER_URL": '""', "PIPELINE_ALLOW_UNSCRUBBED": "true"})
    assert c.scrubbing_bypassed
    with pytest.raises(ConfigError) as err:
        config.load(None, {"PIPELINE_SCRUBBER_URL": '""'})
    assert err.value.key == "scrubberUrl"


# ---------------------------------------------------------------- 2. service URLs


@pytest.mark.parametrize("key", ["panelUrl", "scrubberUrl"])
@pytest.mark.parametrize("url", [f"https://opencode:{PASSWORD}@panel.example",
                                 f"https://admin-user:{PASSWORD}@10.0.0.1:3015/",
                                 "https://admin-user@panel.example",
                                 f"http://admin-user:{PASSWORD}@[::1",  # unparseable as well
                                 f"https://admin-user:{PASSWORD}@@panel.example"])
def test_credentials_in_service_urls_are_refused_without_showing_them(tmp_path: Path, key: str, url: str) -> None:
    err = refused(tmp_path, f'{key} = "{url}"\n')
    assert err.key == key and key in str(err)
    assert PASSWORD not in str(err) and "admin-user" not in str(err)


def test_credentials_in_a_service_url_from_the_environment_are_not_shown() -> None:
    with pytest.raises(ConfigError) as err:
        config.load(None, {"PIPELINE_PANEL_URL": f"https://admin-user:{PASSWORD}@panel.example"})
    assert err.value.key == "panelUrl" and PASSWORD not in str(err.value) and "admin-user" not in str(err.value)


def test_credentials_in_a_host_base_url_are_refused_at_load(tmp_path: Path) -> None:
    err = refused(tmp_path, f'[[hosts]]\nname = "a"\nbase_url = "https://opencode:{PASSWORD}@build-1:4096"\n')
    assert err.key == "hosts[0].base_url" and PASSWORD not in str(err)


@pytest.mark.parametrize(("key", "switch"), [("panelUrl", "[delivery] allow_insecure_http = true"),
                                             ("scrubberUrl", "[scrub] allow_insecure_http = true")])
def test_plain_http_to_another_machine_is_refused_naming_the_switch(tmp_path: Path, key: str, switch: str) -> None:
    err = refused(tmp_path, f'{key} = "http://10.1.2.3:3015"\n')
    assert err.key == key and switch in str(err) and "'10.1.2.3'" in str(err)
    section = switch.split("]")[0].lstrip("[")
    c = load_text(tmp_path, f'{key} = "http://10.1.2.3:3015"\n[{section}]\nallow_insecure_http = true\n')
    assert getattr(c, config.TOP[key].attr) == "http://10.1.2.3:3015"


@pytest.mark.parametrize("url", ["http://127.0.0.1:3015", "http://localhost:1", "http://[::1]:80",
                                 "https://panel.example", "https://10.0.0.1/x/"])
def test_loopback_http_and_https_need_no_switch(tmp_path: Path, url: str) -> None:
    c = load_text(tmp_path, f'panelUrl = "{url}"\nscrubberUrl = "{url}"\n')
    assert c.panel_url == c.scrubber_url == url
    assert c.delivery.allow_insecure_http is False and c.scrub.allow_insecure_http is False


def test_a_switch_for_one_service_does_not_open_the_other(tmp_path: Path) -> None:
    err = refused(tmp_path, 'panelUrl = "http://10.1.2.3:1"\n[scrub]\nallow_insecure_http = true\n')
    assert err.key == "panelUrl"


def test_host_message_still_names_the_host_switch(tmp_path: Path) -> None:
    err = refused(tmp_path, '[[hosts]]\nname = "a"\nbase_url = "http://10.1.2.3:4096"\n')
    assert "allow_insecure_http = true for this host" in str(err)


# ---------------------------------------------------------------- 3. host passwords from the environment

HOST_WITH_ENV = '[[hosts]]\nname = "build-1"\npassword_env = "OPENCODE_PASSWORD_BUILD1"\n'


def test_host_password_from_the_named_variable(tmp_path: Path) -> None:
    c = load_text(tmp_path, HOST_WITH_ENV, {"OPENCODE_PASSWORD_BUILD1": PASSWORD})
    [host] = c.hosts
    assert isinstance(host.password, config.Secret) and host.password.reveal() == PASSWORD
    assert PASSWORD not in repr(c) and PASSWORD not in repr(host)


def test_host_password_env_is_read_from_the_env_given_to_load(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENCODE_PASSWORD_BUILD1", "from-os-environ")
    err = refused(tmp_path, HOST_WITH_ENV, {})  # load's env mapping, not os.environ
    assert "from-os-environ" not in str(err)


@pytest.mark.parametrize("env", [{}, {"OPENCODE_PASSWORD_BUILD1": ""}])
def test_host_password_env_unset_or_empty_names_the_variable(tmp_path: Path, env: dict[str, str]) -> None:
    err = refused(tmp_path, HOST_WITH_ENV, env)
    assert err.key == "hosts[0].password_env" and "OPENCODE_PASSWORD_BUILD1" in str(err)


def test_password_and_password_env_together_are_refused(tmp_path: Path) -> None:
    err = refused(tmp_path, HOST_WITH_ENV + f'password = "{PASSWORD}"\n', {"OPENCODE_PASSWORD_BUILD1": "other"})
    assert err.key == "hosts[0].password_env"
    assert PASSWORD not in str(err) and "other" not in str(err)


@pytest.mark.parametrize("name", ["lower_case", "1STARTS_WITH_DIGIT", "HAS-DASH", "", "A B"])
def test_password_env_must_be_a_variable_name(tmp_path: Path, name: str) -> None:
    err = refused(tmp_path, f'[[hosts]]\nname = "a"\npassword_env = "{name}"\n', {name: "x"})
    assert err.key == "hosts[0].password_env"


def test_a_wrong_typed_password_is_not_shown(tmp_path: Path) -> None:
    err = refused(tmp_path, f'[[hosts]]\nname = "a"\npassword = ["{PASSWORD}"]\n')
    assert err.key == "hosts[0].password" and PASSWORD not in str(err)


def test_shipped_examples_say_what_is_true() -> None:
    # deploy/pipeline.toml's host takes its password from the variable .env.example lists
    deploy = REPO / "deploy" / "pipeline.toml"
    example = (REPO / ".env.example").read_text(encoding="utf-8")
    assert "OPENCODE_PASSWORD_BUILD1=" in example and "password_env" in example
    c = config.load(deploy, {"OPENCODE_PASSWORD_BUILD1": PASSWORD})
    assert [h.password.reveal() if h.password else None for h in c.hosts] == [PASSWORD]
    with pytest.raises(ConfigError) as err:
        config.load(deploy, {})
    assert "OPENCODE_PASSWORD_BUILD1" in str(err.value)


# ---------------------------------------------------------------- 4. unscrubbed retention


def test_unscrubbed_retention_defaults_to_the_source_topics_week(tmp_path: Path) -> None:
    assert config.load(None, {}).kafka.unscrubbed_retention_hours == 168.0
    assert load_text(tmp_path, "[kafka]\nunscrubbed_retention_hours = 1.5\n").kafka.unscrubbed_retention_hours == 1.5


@pytest.mark.parametrize("value", ["0", "-1", "168.5", "169", "inf", "nan", '"24"', "true", "1e400", "9" * 400])
def test_unscrubbed_retention_is_bounded_by_the_source_topics(tmp_path: Path, value: str) -> None:
    err = refused(tmp_path, f"[kafka]\nunscrubbed_retention_hours = {value}\n")
    assert err.key == "kafka.unscrubbed_retention_hours" and "7-day source topics" in str(err)


# ---------------------------------------------------------------- 5. absurd input: ConfigError, not a traceback

HUGE = "9" * 400
HEX_HUGE = "0x" + "f" * 5000  # TOML hex literals have no digit limit; repr() of the int has


@pytest.mark.parametrize(("text", "key"), [
    ("lruSize = 99999999999999999999999\n", "lruSize"),
    (f"lruSize = {HUGE}\n", "lruSize"),
    (f"lruSize = {HEX_HUGE}\n", "lruSize"),
    (f'siteKey = {HEX_HUGE}\n', "siteKey"),
    (f"samplingRate = {HUGE}\n", "samplingRate"),
    (f"samplingRate = [{HEX_HUGE}]\n", "samplingRate"),
    ("samplingRate = 1e400\n", "samplingRate"),
    (f"noveltyThreshold = {HUGE}\n", "noveltyThreshold"),
    (f"maxMessages = {HUGE}\n", "maxMessages"),
    ("maxMessages = 10001\n", "maxMessages"),
    ("lruSize = 10000001\n", "lruSize"),
    (f"[kafka]\npartitions = {HUGE}\n", "kafka.partitions"),
    ("[kafka]\npartitions = 10001\n", "kafka.partitions"),
    ("[kafka]\nreplication = 101\n", "kafka.replication"),
    (f"[kafka]\nlocal_port = {HUGE}\n", "kafka.local_port"),
    (f"[kafka]\nheartbeat_interval_s = {HUGE}\n", "kafka.heartbeat_interval_s"),
    (f"[scrub]\ntimeout_s = {HUGE}\n", "scrub.timeout_s"),
    ("[scrub]\ntimeout_s = 1e300\n", "scrub.timeout_s"),
    (f"[delivery]\nmax_age_s = {HEX_HUGE}\n", "delivery.max_age_s"),
    (f"[collector]\nbuffer_max_records = {HUGE}\n", "collector.buffer_max_records"),
    ("[collector]\nbuffer_max_records = 10000001\n", "collector.buffer_max_records"),
    (f"[collector]\npoll_interval_s = {HUGE}\n", "collector.poll_interval_s"),
    (f"[collector]\ndead_after_heartbeats = {HUGE}\n", "collector.dead_after_heartbeats"),
    (f"[breaker]\nfailure_threshold = {HUGE}\n", "breaker.failure_threshold"),
    (f"[sampler]\nnovelty_window_tokens_messages = {HUGE}\n", "sampler.novelty_window_tokens_messages"),
    (f"[metrics]\nport = {HEX_HUGE}\n", "metrics.port"),
])
def test_huge_numbers_are_config_errors_naming_the_key(tmp_path: Path, text: str, key: str) -> None:
    err = refused(tmp_path, text)
    assert err.key == key and key in str(err)
    assert len(str(err)) < 400  # the value is shown cut short, not 5000 digits


@pytest.mark.parametrize(("name", "value", "key"), [
    ("PIPELINE_LRU_SIZE", HUGE, "lruSize"),
    ("PIPELINE_LRU_SIZE", HEX_HUGE, "lruSize"),
    ("PIPELINE_KAFKA__PARTITIONS", "9" * 5000, "kafka.partitions"),  # past int()'s limit: taken as text
    ("PIPELINE_SCRUB__TIMEOUT_S", HUGE, "scrub.timeout_s"),
    ("PIPELINE_SAMPLING_RATE", "1e400", "samplingRate"),
    ("PIPELINE_ENABLED", "[" * 5000 + "]" * 5000, "PIPELINE_ENABLED"),
    ("PIPELINE_SITE_KEY", "{a = " * 3000 + "1" + "}" * 3000, "PIPELINE_SITE_KEY"),
])
def test_huge_or_deep_environment_values_are_config_errors(name: str, value: str, key: str) -> None:
    with pytest.raises(ConfigError) as err:
        config.load(None, {name: value})
    assert err.value.key == key and key in str(err.value)


@pytest.mark.parametrize("text", [
    "a = " + "[" * 10000 + "]" * 10000 + "\n",
    "samplingRate = " + "[" * 2000 + "]" * 2000 + "\n",
    "a = " + "{b = " * 10000 + "1" + "}" * 10000 + "\n",
    "[kafka]\nbootstrap = " + "[" * 5000 + "]" * 5000 + "\n",
])
def test_deeply_nested_toml_is_a_config_error_naming_the_file(tmp_path: Path, text: str) -> None:
    err = refused(tmp_path, text)
    assert err.key == "--config" and str(tmp_path / "c.toml") in str(err) and "nested too deeply" in str(err)


@pytest.mark.parametrize(("text", "expect"), [
    ("a = " + "[" * 10000 + "]" * 10000 + "\n", "nested too deeply"),
    (f"lruSize = {HEX_HUGE}\n", "lruSize"),
    ('scrubberUrl = ""\n', "allowUnscrubbed"),
    (f'panelUrl = "https://u:{PASSWORD}@panel.example"\n', "panelUrl"),
])
def test_cli_exits_2_without_a_traceback(tmp_path: Path, text: str, expect: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text, encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIPELINE_")}
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "--config", str(path), "topics", "list"],
                          capture_output=True, text=True, timeout=60, cwd=REPO, env=env)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert expect in proc.stderr and "Traceback" not in proc.stderr
    assert PASSWORD not in proc.stderr
