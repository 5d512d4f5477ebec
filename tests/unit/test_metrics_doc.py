"""The README's metrics table lists exactly the metrics pipeline/metrics.py declares, with
the same types and labels, so an operator writing an alert from the README gets a series
that exists.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import pytest
from prometheus_client.metrics import MetricWrapperBase

from pipeline import metrics
from tests.fixtures import REPO

README = REPO / "README.md"
HEADING = "### Metrics"
COLUMNS = ["metric", "type", "labels", "meaning"]


@dataclass(frozen=True)
class MetricDoc:
    name: str  # as scraped: counters with their `_total`
    type: str
    labels: tuple[str, ...]
    meaning: str = ""


def declared_metrics() -> dict[str, MetricDoc]:
    """Every metric object in pipeline.metrics, by its scraped name, read from the objects
    prometheus_client holds (not from the source text)."""
    out: dict[str, MetricDoc] = {}
    for value in vars(metrics).values():
        if not isinstance(value, MetricWrapperBase):
            continue
        # prometheus_client strips `_total` from a counter's name and adds it back when scraped.
        name = value._name + ("_total" if value._type == "counter" else "")
        out[name] = MetricDoc(name, value._type, tuple(value._labelnames))
    return out


def _cells(line: str) -> list[str]:
    line = line.strip()
    if line.startswith("|"):
        line = line[1:]
    if line.endswith("|") and not line.endswith("\\|"):
        line = line[:-1]
    return [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line)]


def _names(cell: str) -> list[str]:
    """`a`, `b` -> [a, b]; an empty cell or a dash means no labels."""
    return [n for n in re.split(r"[\s,]+", cell.replace("`", "")) if n and n not in {"-", "—", "none"}]


def parse_metrics_table(text: str, source: str) -> dict[str, MetricDoc]:
    """The first table under a `### Metrics` heading, up to the next heading."""
    lines = text.splitlines()
    try:
        start = next(i for i, line in enumerate(lines) if line.strip().lower() == HEADING.lower())
    except StopIteration:
        pytest.fail(f"{source} has no `{HEADING}` section: it must document every metric of pipeline/metrics.py")
    section: list[str] = []
    for line in lines[start + 1:]:
        if re.match(r"^#{1,3}\s", line):
            break
        section.append(line)
    rows = [line for line in section if line.strip().startswith("|")]
    if len(rows) < 3:
        pytest.fail(f"{source}: the `{HEADING}` section has no table with a header, a separator and rows")
    header = [c.lower() for c in _cells(rows[0])]
    assert header == COLUMNS, f"{source}: metrics table columns are {header}, expected {COLUMNS}"
    assert set("".join(_cells(rows[1]))) <= set("-: "), f"{source}: second table line is not a separator"
    out: dict[str, MetricDoc] = {}
    for row in rows[2:]:
        cells = _cells(row)
        assert len(cells) == len(COLUMNS), f"{source}: row has {len(cells)} cells, expected 4: {row}"
        names = _names(cells[0])
        assert len(names) == 1, f"{source}: one metric per row, got {cells[0]!r}"
        name = names[0]
        assert name not in out, f"{source}: {name} is listed twice"
        out[name] = MetricDoc(name, cells[1].strip("` ").lower(), tuple(_names(cells[2])), cells[3])
    return out


def check_table(documented: dict[str, MetricDoc], source: str) -> None:
    declared = declared_metrics()
    missing = sorted(set(declared) - set(documented))
    extra = sorted(set(documented) - set(declared))
    assert not missing, f"{source}: metrics declared in pipeline/metrics.py but not documented: {missing}"
    assert not extra, f"{source}: documented metrics that pipeline/metrics.py does not declare: {extra}"
    for name, doc in documented.items():
        want = declared[name]
        assert doc.type == want.type, f"{source}: {name} is documented as {doc.type}, declared as {want.type}"
        # Order matters to nobody querying, so compare as sets, but both ways.
        assert sorted(doc.labels) == sorted(want.labels), \
            f"{source}: {name} documented labels {list(doc.labels)}, declared {list(want.labels)}"
        assert len(doc.meaning) > 40 and "alert" in doc.meaning.lower(), \
            f"{source}: {name} needs a sentence on what it means and when to alert"


def test_module_declares_metrics_once_each() -> None:
    objects = [v for v in vars(metrics).values() if isinstance(v, MetricWrapperBase)]
    assert objects, "pipeline/metrics.py declares no metrics?"
    assert len({id(o) for o in objects}) == len(declared_metrics()), "two objects share a scraped name"


def test_readme_metrics_table_matches_module() -> None:
    if not README.exists():
        pytest.fail(f"{README} does not exist: it needs a `{HEADING}` section")
    check_table(parse_metrics_table(README.read_text(encoding="utf-8"), "README.md"), "README.md")


def test_parser_reports_what_is_wrong() -> None:
    """The checker itself: a drifted table fails and says how."""
    good = README.read_text(encoding="utf-8")
    with pytest.raises(pytest.fail.Exception, match="no `### Metrics` section"):
        parse_metrics_table("# Title\n\nnothing here\n", "x.md")
    dropped = "\n".join(line for line in good.splitlines() if "`pipeline_breaker_state`" not in line)
    with pytest.raises(AssertionError, match=r"not documented: \['pipeline_breaker_state'\]"):
        check_table(parse_metrics_table(dropped, "x.md"), "x.md")
    relabelled = good.replace("| `pipeline_collector_connected` | gauge | `host` |",
                              "| `pipeline_collector_connected` | gauge | `host`, `site` |")
    assert relabelled != good
    with pytest.raises(AssertionError, match="pipeline_collector_connected documented labels"):
        check_table(parse_metrics_table(relabelled, "x.md"), "x.md")
