"""The README's Configuration table is the reference users read: it must list every server setting, under
its real flag and environment variable, with its real default and the bounds the settings class enforces."""

from __future__ import annotations

import re
from typing import Literal, get_args, get_origin

from service.settings import ServerSettings
from tests.conftest import REPO


def _config_rows() -> dict[str, list[str]]:
    text = (REPO / "README.md").read_text()
    section = text.split("## Configuration", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 5:
            env = re.search(r"`(AGENTPRM_[A-Z0-9_]+)`", cells[1])
            if env:
                rows[env.group(1)] = cells
    return rows


def _shown(default) -> str:
    if isinstance(default, bool):
        return "true" if default else "false"
    if isinstance(default, float) and default.is_integer():
        return str(int(default))
    return str(default)


def test_every_setting_is_documented_with_its_flag_and_default():
    rows = _config_rows()
    fields = ServerSettings.model_fields
    expected = {f"AGENTPRM_{name.upper()}" for name in fields}
    assert set(rows) == expected, f"missing: {sorted(expected - set(rows))}, unknown: {sorted(set(rows) - expected)}"
    for name, field in fields.items():
        flag, _, default, allowed, meaning = rows[f"AGENTPRM_{name.upper()}"]
        assert allowed, name
        for bound in _bounds(field):
            assert bound in allowed, (name, bound, allowed)
        assert f"--{name.replace('_', '-')}" in flag, name
        assert meaning, name
        value = field.get_default(call_default_factory=True)
        if value is None or value == []:
            assert re.search(r"none|unset", default), (name, default)
        else:
            first = re.search(r"`([^`]*)`", default)
            assert first and first.group(1) == _shown(value), (name, default, value)


def _bounds(field) -> list[str]:
    """How the table must state the field's declared bounds ("1 to 4096", ">= 1024", "`text`", ...)."""
    limits = {}
    for item in field.metadata:
        for key in ("ge", "gt", "le", "lt"):
            if getattr(item, key, None) is not None:
                limits[key] = getattr(item, key)
    if "ge" in limits and "le" in limits:
        return [f"{limits['ge']} to {limits['le']}"]
    shown = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}
    found = [f"{shown[key]} {value}" for key, value in limits.items()]
    if get_origin(field.annotation) is Literal:
        found += [f"`{choice}`" for choice in get_args(field.annotation)]
    if field.annotation is bool:
        found += ["`true`", "`false`"]
    return found
