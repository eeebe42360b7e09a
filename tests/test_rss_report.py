"""The demo report shows the process RSS next to the tensor figures when its rows carry it."""

from __future__ import annotations

from pathlib import Path

import pytest

from ondevice.cli.demo_report import write_report

ROW = {
    "scheme": "bias",
    "stock_activation_bytes": 80 << 20,
    "ondevice_activation_bytes": 1 << 20,
    "stock_peak_bytes": 87 << 20,
    "ondevice_peak_bytes": 16 << 20,
}


@pytest.mark.parametrize("with_rss", [True, False])
def test_memory_table_shows_rss_when_given(tmp_path: Path, with_rss: bool) -> None:
    pytest.importorskip("matplotlib")
    rss = {"stock_rss_added_bytes": 148 << 20, "ondevice_rss_added_bytes": 46 << 20}
    row = {**ROW, **rss} if with_rss else ROW
    files = write_report(tmp_path / "report", figures={"memory": [row]})
    text = files.markdown.read_text()
    assert ("ondevice RSS added" in text) is with_rss
    assert ("46.0 MiB" in text) is with_rss
    assert "80.00 MiB" in text
