"""The README's configuration tables are generated from the key declarations and kept in step."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest

from pipeline import config
from pipeline.config import doc
from tests.fixtures import REPO


def test_readme_tables_are_the_generated_ones() -> None:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert readme.count(doc.BEGIN) == 1 and readme.count(doc.END) == 1
    assert doc.readme_block(readme) == doc.markdown(), (
        "README.md's configuration tables differ from the declarations: "
        "run `python -m pipeline.config --write README.md`")


def test_the_command_prints_the_tables() -> None:
    proc = subprocess.run([sys.executable, "-m", "pipeline.config", "--markdown"], capture_output=True,
                          text=True, timeout=60, cwd=REPO, check=True)
    assert proc.stdout == doc.markdown()


def test_every_key_has_help_and_a_documented_rule() -> None:
    tables = [config.TOP, config.HOST, *config.section_keys().values()]
    for keys in tables:
        for spec in keys.values():
            assert spec.help.strip(), spec.name
            assert isinstance(spec.check, config.Rule) and spec.check.what, spec.name
            # a default the loader would refuse cannot be a default
            assert spec.default is None or spec.check(spec.default) is None, spec.name
    text = doc.markdown()
    for name, keys in config.section_keys().items():
        assert f"`[{name}]`" in text
        for key in keys:
            assert f"| `{key}` |" in text


def test_with_tables_replaces_only_between_the_markers() -> None:
    before = f"# t\n\nintro\n<!-- config-tables: stale -->\nold\n{doc.END}\nafter\n"
    out = doc.with_tables(before)
    assert out.startswith("# t\n\nintro\n" + doc.BEGIN + "\n") and out.endswith(doc.END + "\nafter\n")
    assert doc.readme_block(out) == doc.markdown()


def test_sections_are_frozen_typed_objects() -> None:
    c = config.load(None, {})
    for name, cls in config.SECTIONS.items():
        section = getattr(c, name)
        assert type(section) is cls and dataclasses.is_dataclass(section)
        attr = dataclasses.fields(section)[0].name
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(section, attr, None)


def test_the_components_run_with_the_declared_defaults() -> None:
    from pipeline.collector.settings import CollectorSettings
    from pipeline.delivery.breaker import BreakerSettings

    c = config.load(None, {})
    assert CollectorSettings.from_config(c) == CollectorSettings()
    assert isinstance(CollectorSettings(), config.CollectorConfig)  # the keys are the section's own
    assert isinstance(BreakerSettings(), config.BreakerConfig)
    assert BreakerSettings.from_section(c.breaker) == BreakerSettings()
