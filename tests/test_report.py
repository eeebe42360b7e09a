"""The demo's report: Markdown rendered as HTML, user strings kept literal, and what its tables cover."""

from __future__ import annotations

from importlib.metadata import version
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ondevice.cli import app
from ondevice.cli.demo import _settings, check_out_folder
from ondevice.cli.demo_report import markdown_text, write_report

PLAN_TABLE = "| what | bytes |\n|---|---:|\n| activations | 10 |\n"


def _figures() -> dict[str, object]:
    return {
        "settings": {**_settings(quick=True, device="generic-linux"), "date": "2030-01-02 03:04 UTC"},
        "device": {
            "name": "generic-linux",
            "description": "<script>alert(1)</script> **not bold** [/bold] a|b",
            "budget": "1.0 GiB (generic-linux)",
        },
        "plan": {
            "scheme": "full",
            "table": PLAN_TABLE,
            "requirement": "**Requirement (compared with the budget): 1 KiB**\n\n- a point\n- another",
            "batch_size": 10,
            "input_shape": [1, 8, 8],
        },
    }


def test_report_html_renders_markdown_and_keeps_user_text_literal(tmp_path: Path) -> None:
    files = write_report(tmp_path / "report", figures=_figures())
    page = files.html.read_text()
    assert "<strong>generic-linux</strong>" in page and "**generic-linux**" not in page
    assert "<code>full</code>" in page and "`full`" not in page
    assert "<table>" in page and "<th>what</th>" in page and "<td>activations</td>" in page
    assert "<h2>The planned update scheme</h2>" in page and "<li>a point</li>" in page
    assert "<strong>Requirement (compared with the budget): 1 KiB</strong>" in page
    # The device's own text is shown as written: no HTML injected, no Markdown interpreted.
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "**not bold** [/bold] a|b" in page
    assert "<strong>not bold</strong>" not in page


def test_report_states_model_resolution_batch_seed_version_and_date(tmp_path: Path) -> None:
    figures = _figures()
    figures["memory"] = []  # no plots needed for this check
    figures["stream"] = None
    files = write_report(tmp_path / "report", figures=figures)
    text = files.markdown.read_text()
    page = files.html.read_text()
    assert f"ondevice {markdown_text(version('ondevice'))}" in text and "2030-01-02 03:04 UTC" in text
    assert "seed 0" in text and "| section | model | input per sample | batch size | seed |" in text
    assert "| planned scheme | backbone | 1 x 8 x 8 | 10 |" in text
    assert "<h2>What this report covers</h2>" in page and "2030-01-02 03:04 UTC" in page


def test_markdown_text_escapes_what_markdown_and_html_would_read() -> None:
    assert markdown_text("**x** `y` <b> [a](b) |") == r"\*\*x\*\* \`y\` \<b\> \[a\](b) \|"
    assert markdown_text("generic-linux") == "generic-linux"


def test_demo_out_that_is_a_file_fails_before_any_work(tmp_path: Path) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("keep me")
    result = CliRunner().invoke(app, ["demo", "--quick", "--skip-federated", "--out", str(notes)])
    assert result.exit_code == 2, result.output
    assert "--out" in result.output and "is a file" in result.output
    assert "1/4" not in result.output and notes.read_text() == "keep me"
    assert "is a file" in (check_out_folder(notes / "sub" / "report") or "")
    assert check_out_folder(tmp_path / "new" / "report") is None


@pytest.mark.parametrize("device", ["[/bold]", "no-such-board"])
def test_demo_unknown_device_fails_before_any_work(tmp_path: Path, device: str) -> None:
    result = CliRunner().invoke(app, ["demo", "--quick", "--device", device, "--out", str(tmp_path / "r")])
    assert result.exit_code == 2, result.output
    assert device in result.output and "1/4" not in result.output
