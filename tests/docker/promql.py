"""Metric and label names used by PromQL expressions (alerts, dashboard panels, adapter rules).

Contract: `selectors(expr)` returns every vector selector as (metric name, label names in its matchers);
`grouping_labels(expr)` returns the label names of `by`/`without`/`on`/`ignoring`/`group_*` clauses;
`metric_names(expr)` returns the metric names. Grafana variables (`$instance`, `$__rate_interval`) may
appear inside matchers and ranges. Not a full PromQL parser: enough for the expressions in docker/, and
strict where it matters: an identifier that is not a function, keyword or label is taken as a metric.
"""

from __future__ import annotations

import re

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'')
_IDENT = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
_SELECTOR = re.compile(rf"(?<![\w$.])({_IDENT})?\s*\{{([^}}]*)\}}")
_MATCHER = re.compile(rf"({_IDENT})\s*(?:=~|!~|!=|=)\s*\"\"")
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
_RANGE = re.compile(r"\[[^\]]*\]")
_BARE = re.compile(rf"(?<![\w$.:])({_IDENT})(?![\w:]|\s*\()")
KEYWORDS = {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring", "group_left",
            "group_right", "inf", "nan", "Inf", "NaN", "atan2"}


def _blank_strings(expr: str) -> str:
    return _STRING.sub('""', expr)


def selectors(expr: str) -> list[tuple[str, frozenset[str]]]:
    """(metric, matcher label names) for every selector; a bare metric has no labels."""
    text = _blank_strings(expr)
    found = []
    for match in _SELECTOR.finditer(text):
        labels = set(_MATCHER.findall(match.group(2)))
        name = match.group(1)
        if name is None:  # {__name__="..."} style selectors are not used in docker/
            raise ValueError(f"selector without a metric name in {expr!r}")
        found.append((name, frozenset(labels)))
    rest = _GROUPING.sub(" ", _RANGE.sub(" ", _SELECTOR.sub(" ", text)))
    for name in _BARE.findall(rest):
        if name not in KEYWORDS and not re.fullmatch(r"\d.*", name):
            found.append((name, frozenset()))
    return found


def metric_names(expr: str) -> set[str]:
    return {name for name, _ in selectors(expr)}


def grouping_labels(expr: str) -> set[str]:
    text = _blank_strings(expr)
    labels = set()
    for _, inner in _GROUPING.findall(text):
        labels.update(part.strip() for part in inner.split(",") if part.strip())
    return labels


def grafana_label_values(query: str) -> tuple[str, frozenset[str], str]:
    """`label_values(metric{matchers}, label)` -> (metric, matcher labels, label)."""
    match = re.fullmatch(rf"\s*label_values\(\s*(.+?),\s*({_IDENT})\s*\)\s*", query)
    if not match:
        raise ValueError(f"not a label_values() query: {query!r}")
    (found,) = selectors(match.group(1))
    return found[0], found[1], match.group(2)
