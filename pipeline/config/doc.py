"""The README's configuration tables, generated from the declared keys.

`markdown()` is exactly what README.md holds between its `config-tables` markers;
tests/unit/config/test_config_doc.py fails when the two drift apart, so a key's documentation
changes where the key is declared.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Iterable
from typing import Any

from pipeline.config.keys import Key, keys_of
from pipeline.config.loader import HOST, SECTIONS, TOP
from pipeline.config.sections import HostTable

BEGIN = ("<!-- config-tables: generated from the key declarations in pipeline/config/sections.py by "
         "`python -m pipeline.config --markdown`; tests/unit/config/test_config_doc.py fails when they drift -->")
END = "<!-- config-tables: end -->"


def toml_literal(value: Any) -> str:
    """`value` as it is written in a TOML file."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    return repr(value)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _default(spec: Key) -> str:
    if spec.doc_default is not None:
        return spec.doc_default
    if spec.default is None:
        return "(unset)"
    return f"`{toml_literal(spec.default)}`"


def _accepts(spec: Key) -> str:
    return getattr(spec.check, "what", "")


def table(keys: Iterable[Key]) -> list[str]:
    rows = ["| key | default | accepts | meaning |", "|---|---|---|---|"]
    rows += [f"| `{k.name}` | {_cell(_default(k))} | {_cell(_accepts(k))} | {_cell(k.help)} |" for k in keys]
    return rows


def _summary(cls: type) -> str:
    return (inspect.getdoc(cls) or "").split("\n\n")[0].replace("\n", " ")


def markdown() -> str:
    """The tables, without the marker lines, ending in a newline."""
    lines = ["Top-level keys (`PIPELINE_<KEY>` in upper snake case overrides one: "
             "`PIPELINE_SAMPLING_RATE`):", "", *table(TOP.values()), "",
             "Sections, every key optional (`PIPELINE_<SECTION>__<KEY>` overrides one: `PIPELINE_KAFKA__BOOTSTRAP`):"]
    for name, cls in SECTIONS.items():
        lines += ["", f"`[{name}]`: {_summary(cls)}", "", *table(keys_of(cls).values())]
    lines += ["", f"`[[hosts]]`, one per daemon: {_summary(HostTable)}", "", *table(HOST.values())]
    return "\n".join(lines) + "\n"


def readme_block(readme: str) -> str:
    """What `readme` holds between the markers (the marker lines excluded)."""
    _, sep, rest = readme.partition(BEGIN + "\n")
    body, sep2, _ = rest.partition(END)
    if not sep or not sep2:
        raise ValueError("README has no config-tables markers")
    return body


def with_tables(readme: str) -> str:
    """`readme` with the generated tables between its markers."""
    head, _, rest = readme.partition("<!-- config-tables:")
    _, _, after = rest.partition(END)
    return f"{head}{BEGIN}\n{markdown()}{END}{after}"
