"""Error messages read as English: a registry's kind is pluralised properly."""

from __future__ import annotations

import pytest

from ondevice.errors import UnknownNameError


@pytest.mark.parametrize(
    ("kind", "plural"),
    [("strategy", "strategies"), ("policy", "policies"), ("scheme", "schemes"), ("relay", "relays")],
)
def test_unknown_name_lists_the_valid_choices_under_the_right_plural(kind: str, plural: str) -> None:
    error = UnknownNameError(kind, "nosuch", ["a", "b"])
    assert f"valid {plural} are: 'a', 'b'" in str(error)
