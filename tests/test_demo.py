"""`ondevice demo` end to end: plan, stream, federation, and a report whose images really are images."""

from __future__ import annotations

import json
from importlib.metadata import version
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from ondevice.cli import app

runner = CliRunner()


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.xdist_group("flower")
def test_quick_demo_writes_the_report(tmp_path: Path) -> None:
    out = tmp_path / "report"
    result = runner.invoke(app, ["demo", "--quick", "--json", "--out", str(out), "--device", "rpi-4b-2gb"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["device"]["name"] == "rpi-4b-2gb" and not summary["device"]["detected"]
    assert summary["plan"]["needed_bytes"] <= summary["device"]["training_budget_bytes"]
    # A Raspberry Pi's budget holds full fine-tuning: the plan is called full, not "sparse" with every layer.
    assert summary["plan"]["scheme"] == "full"
    assert summary["device"]["count_frozen_params"]  # a Linux board keeps frozen weights in RAM
    for row in summary["memory"]:
        assert row["ondevice_activation_bytes"] <= row["stock_activation_bytes"]
    bias = next(r for r in summary["memory"] if r["scheme"] == "bias")
    assert bias["stock_activation_bytes"] > 20 * bias["ondevice_activation_bytes"]
    stream = summary["stream"]
    assert len(stream["matrix"]) == 5 and 0.5 < stream["acc"] <= 1.0
    rounds = summary["federated"]["rounds"]
    assert len(rounds) == 2 and all(r["bytes_up"] > 0 and r["bytes_down"] > 0 for r in rounds)

    for name in ("index.md", "index.html", "figures.json"):
        assert (out / name).stat().st_size > 0
    figures = json.loads((out / "figures.json").read_text())
    assert set(figures) >= {"device", "plan", "memory", "stream", "federated"}
    html = (out / "index.html").read_text()
    assert "<strong>rpi-4b-2gb</strong>" in html and "**" not in html and "`" not in html
    assert "What this report covers" in html and f"ondevice {version('ondevice')}" in html
    assert "mobilenetv2-w0.35" in html and "seed" in html
    for plot in ("memory_by_scheme", "stream_accuracy", "accuracy_matrix", "federated_rounds"):
        path = out / "plots" / f"{plot}.png"
        assert f"plots/{plot}.png" in html
        with Image.open(path) as image:
            image.verify()
        with Image.open(path) as image:
            assert image.format == "PNG" and image.size[0] >= 500 and image.size[1] >= 300
            colours = image.convert("RGB").getcolors(maxcolors=1 << 16)
            assert colours is None or len(colours) > 20  # a drawing, not a blank canvas
