"""The demo's report folder: a Markdown and an HTML summary with PNG plots, and every figure as JSON.

The functions take plain, JSON-ready data (what the demo measured), draw with matplotlib's Agg backend
(the ``report`` extra; imported only when a report is written) and never reach the network.
"""

from __future__ import annotations

import html
import json
import logging
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ondevice.checkpoint import atomic_write_bytes
from ondevice.errors import ConfigError

__all__ = [
    "ReportFiles",
    "markdown_text",
    "plot_accuracy_matrix",
    "plot_federated_rounds",
    "plot_memory_by_scheme",
    "plot_stream_accuracy",
    "write_report",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReportFiles:
    """Paths of what :func:`write_report` wrote."""

    folder: Path
    markdown: Path
    html: Path
    figures_json: Path
    plots: dict[str, Path]


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise ConfigError(
            "writing the report needs matplotlib: pip install 'ondevice[report]' (make demo installs it)"
        ) from None
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _mib(n: float) -> float:
    return n / 2**20


def plot_stream_accuracy(
    path: Path,
    *,
    correct: Sequence[float],
    boundaries: Sequence[int] = (),
    window: int = 50,
    title: str = "Accuracy over the stream",
) -> Path:
    """Prequential accuracy (each sample predicted before it is learned), rolling mean over ``window``."""
    plt = _pyplot()
    values = [float(v) for v in correct]
    rolling: list[float] = []
    total = 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        rolling.append(total / min(i + 1, window))
    fig, ax = plt.subplots(figsize=(7, 3.6), dpi=110)
    ax.plot(range(1, len(rolling) + 1), rolling, color="#1f77b4", lw=1.8, label=f"rolling mean ({window})")
    for k, b in enumerate(boundaries):
        ax.axvline(b, color="#999999", ls="--", lw=0.8, label="new experience" if k == 0 else None)
    ax.set_xlabel("samples seen on the device")
    ax.set_ylabel("prequential accuracy")
    ax.set_ylim(0, 1.02)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_accuracy_matrix(path: Path, *, matrix: Sequence[Sequence[float]], labels: Sequence[str]) -> Path:
    """R[i][j]: accuracy on experience j after training through experience i, as a heat map."""
    plt = _pyplot()
    rows = [list(map(float, r)) for r in matrix]
    if not rows:
        raise ConfigError("the accuracy matrix is empty")
    fig, ax = plt.subplots(figsize=(5.4, 4.6), dpi=110)
    image = ax.imshow(rows, vmin=0.0, vmax=1.0, cmap="viridis")
    for i, row in enumerate(rows):
        for j, value in enumerate(row):
            ax.text(
                j,
                i,
                f"{value:.2f}",
                ha="center",
                va="center",
                fontsize=8,
                color="white" if value < 0.6 else "black",
            )
    ax.set_xticks(range(len(rows[0])), [str(x) for x in labels][: len(rows[0])], fontsize=8)
    ax.set_yticks(range(len(rows)), [f"after {x}" for x in labels][: len(rows)], fontsize=8)
    ax.set_xlabel("tested on experience")
    ax.set_title("Accuracy matrix R[i][j]")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_memory_by_scheme(path: Path, *, rows: Sequence[Mapping[str, Any]]) -> Path:
    """Saved-for-backward bytes per scheme: stock PyTorch against ondevice (log scale)."""
    plt = _pyplot()
    names = [str(r["scheme"]) for r in rows]
    stock = [max(_mib(r["stock_activation_bytes"]), 1e-4) for r in rows]
    ours = [max(_mib(r["ondevice_activation_bytes"]), 1e-4) for r in rows]
    fig, ax = plt.subplots(figsize=(7, 3.8), dpi=110)
    xs = range(len(names))
    ax.bar([x - 0.2 for x in xs], stock, width=0.4, label="stock PyTorch", color="#d62728")
    ax.bar([x + 0.2 for x in xs], ours, width=0.4, label="ondevice", color="#2ca02c")
    for x, (s, o) in enumerate(zip(stock, ours, strict=True)):
        ax.text(
            x + 0.2,
            o,
            f"{s / o:.0f}x" if o > 0 and s / o >= 1.5 else "",
            ha="center",
            va="bottom",
            fontsize=8,
        )
    ax.set_yscale("log")
    ax.set_xticks(list(xs), names)
    ax.set_ylabel("activations kept for backward (MiB)")
    ax.set_title("Training-step activation memory per update scheme")
    ax.grid(axis="y", alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_federated_rounds(path: Path, *, rounds: Sequence[Mapping[str, Any]]) -> Path:
    """Bytes sent down and up per federated round (bars) and the global accuracy (line)."""
    plt = _pyplot()
    numbers = [int(r["round"]) for r in rounds]
    down = [r["bytes_down"] / 1024 for r in rounds]
    up = [r["bytes_up"] / 1024 for r in rounds]
    fig, ax = plt.subplots(figsize=(7, 3.8), dpi=110)
    ax.bar([n - 0.2 for n in numbers], down, width=0.4, label="server -> devices", color="#9467bd")
    ax.bar([n + 0.2 for n in numbers], up, width=0.4, label="devices -> server", color="#ff7f0e")
    ax.set_xlabel("round")
    ax.set_ylabel("bytes on the wire (KiB)")
    ax.set_xticks(numbers)
    accuracy = [r.get("accuracy") for r in rounds]
    if any(a is not None for a in accuracy):
        twin = ax.twinx()
        twin.plot(
            numbers,
            [a if a is not None else float("nan") for a in accuracy],
            "o-",
            color="#1f77b4",
            label="accuracy",
        )
        twin.set_ylim(0, 1.02)
        twin.set_ylabel("global accuracy")
        twin.legend(loc="lower right", fontsize=8)
    ax.set_title("Federated rounds: only trainable tensors travel")
    ax.legend(loc="upper left", fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


_MARKDOWN_SPECIALS = re.compile(r"([\\`*_\[\]<>|#!~&])")


def _memory_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """Activations and tensor peak per scheme, stock vs ondevice, plus the process RSS when rows carry it."""
    rss = all("ondevice_rss_added_bytes" in r and "stock_rss_added_bytes" in r for r in rows)
    header = ["scheme", "stock activations", "ondevice activations", "ratio", "stock peak", "ondevice peak"]
    if rss:
        header += ["stock RSS added", "ondevice RSS added"]
    body = []
    for r in rows:
        cells = [
            r["scheme"],
            f"{_mib(r['stock_activation_bytes']):.2f} MiB",
            f"{_mib(r['ondevice_activation_bytes']):.3f} MiB",
            f"{r['stock_activation_bytes'] / max(1, r['ondevice_activation_bytes']):.1f}x",
            f"{_mib(r['stock_peak_bytes']):.2f} MiB",
            f"{_mib(r['ondevice_peak_bytes']):.2f} MiB",
        ]
        if rss:
            cells += [f"{_mib(r['stock_rss_added_bytes'] or 0):.1f} MiB",
                      f"{_mib(r['ondevice_rss_added_bytes'] or 0):.1f} MiB"]  # fmt: skip
        body.append(cells)
    return _table(header, body)


def markdown_text(value: object) -> str:
    """``value`` as literal Markdown text: every character Markdown or HTML would interpret is escaped.

    Device names, descriptions and other strings that come from users or the machine go through this, so
    ``**x**`` stays two asterisks and ``<b>`` stays text in both the Markdown and the HTML.
    """
    return _MARKDOWN_SPECIALS.sub(r"\\\1", " ".join(str(value).split()))


def _markdown_to_html(markdown: str, title: str) -> str:
    """Render the report's Markdown (CommonMark + tables) as a standalone HTML page.

    markdown-it-py (rich's own Markdown parser, so always installed) renders it with raw HTML disabled:
    any ``<tag>`` in the text is escaped, never passed through.
    """
    from markdown_it import MarkdownIt

    body = MarkdownIt("commonmark", {"html": False}).enable("table").render(markdown)
    return "\n".join(
        [
            "<!doctype html><html><head><meta charset='utf-8'>",
            f"<title>{html.escape(title)}</title>",
            "<style>body{font-family:sans-serif;max-width:960px;margin:2em auto;padding:0 1em;color:#222}"
            "table{border-collapse:collapse;margin:1em 0}"
            "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}"
            "td:first-child,th:first-child{text-align:left}img{max-width:100%}"
            "code{background:#f4f4f4;padding:0 3px}</style></head><body>",
            body,
            "</body></html>",
        ]
    )


def _settings_section(figures: Mapping[str, Any]) -> list[str]:
    """What the tables cover: version, date, seed, and each section's model, input and batch size."""
    settings = figures.get("settings") or {}
    md = ["## What this report covers", ""]
    if settings:
        md += [
            f"ondevice {markdown_text(settings.get('version', '?'))}, written "
            f"{markdown_text(settings.get('date', '?'))}; seed {markdown_text(settings.get('seed', '?'))} "
            f"for every random draw; device {markdown_text(settings.get('device', '?'))}"
            + ("; quick pass" if settings.get("quick") else "")
            + ".",
            "",
        ]
    rows = []
    plan = figures.get("plan")
    if plan and plan.get("input_shape"):
        rows.append(["planned scheme", (figures.get("stream") or {}).get("model", "backbone"),
                     plan["input_shape"], plan.get("batch_size", "-"), "-"])  # fmt: skip
    memory_rows = figures.get("memory") or []
    if memory_rows and "resolution" in memory_rows[0]:
        first = memory_rows[0]
        side = first["resolution"]
        rows.append(["memory per scheme", "mobilenetv2-w0.35", [3, side, side], first["batch_size"],
                     first.get("seed", "-")])  # fmt: skip
    stream = figures.get("stream")
    if stream and stream.get("model"):
        rows.append(["continual learning", stream["model"], stream.get("input_shape", "-"),
                     stream.get("batch_size", "-"), stream.get("seed", "-")])  # fmt: skip
    federated = figures.get("federated")
    if federated and federated.get("model"):
        rows.append(["federated simulation", federated["model"], "-", federated.get("batch_size", "-"),
                     federated.get("seed", "-")])  # fmt: skip
    if rows:
        shape = [
            [
                markdown_text(name),
                markdown_text(model),
                markdown_text(" x ".join(str(d) for d in dims) if isinstance(dims, list | tuple) else dims),
                markdown_text(batch),
                markdown_text(seed),
            ]
            for name, model, dims, batch, seed in rows
        ]
        md += [_table(["section", "model", "input per sample", "batch size", "seed"], shape), ""]
    return md


def write_report(
    folder: str | os.PathLike[str],
    *,
    figures: Mapping[str, Any],
    title: str = "ondevice demo report",
) -> ReportFiles:
    """Write ``index.md``, ``index.html``, ``figures.json`` and the PNG plots into ``folder``.

    ``figures`` is the demo's summary (JSON-ready): keys ``device``, ``plan``, ``memory`` (rows with
    ``scheme``, ``stock_activation_bytes``, ``ondevice_activation_bytes``, ``stock_peak_bytes``,
    ``ondevice_peak_bytes``), ``stream`` (``correct`` per sample, ``boundaries``, ``matrix``,
    ``experience_labels``, ``acc``, ``bwt``, ``avg_forgetting``) and ``federated`` (``rounds`` with
    ``round``, ``accuracy``, ``bytes_up``, ``bytes_down``); a missing section is left out.
    """
    root = Path(folder)
    (root / "plots").mkdir(parents=True, exist_ok=True)
    plots: dict[str, Path] = {}
    md: list[str] = [f"# {markdown_text(title)}", ""]
    md += _settings_section(figures)
    device = figures.get("device")
    if device:
        md += [
            "## The device and its budget",
            "",
            f"Profile **{markdown_text(device.get('name'))}**: "
            f"{markdown_text(device.get('description', ''))}",
            "",
            f"Training budget: {markdown_text(device.get('budget'))}.",
            "",
        ]
    plan = figures.get("plan")
    if plan:
        md += ["## The planned update scheme", "", f"Scheme: `{plan.get('scheme')}`", ""]
        if plan.get("requirement"):
            md += [plan["requirement"], ""]
        if plan.get("table"):
            md += [plan["table"], ""]
    memory_rows = figures.get("memory")
    if memory_rows:
        plots["memory"] = plot_memory_by_scheme(root / "plots" / "memory_by_scheme.png", rows=memory_rows)
        md += [
            "## Memory per scheme against stock PyTorch",
            "",
            "![Activation memory of one training step per scheme, stock PyTorch vs ondevice (log scale)]"
            "(plots/memory_by_scheme.png)",
            "",
            _memory_table(memory_rows),
            "",
        ]
        if all("ondevice_rss_added_bytes" in r for r in memory_rows):
            md += [
                "RSS added = how far the demo process's peak resident memory rose during each measured step "
                "(`MemoryReport.rss_added_bytes`): what the device sees beyond the tensors. "
                "`python bench/memory.py` measures it per variant in a fresh process.",
                "",
            ]
    stream = figures.get("stream")
    if stream:
        plots["stream"] = plot_stream_accuracy(
            root / "plots" / "stream_accuracy.png",
            correct=stream["correct"],
            boundaries=stream.get("boundaries", ()),
        )
        plots["matrix"] = plot_accuracy_matrix(
            root / "plots" / "accuracy_matrix.png",
            matrix=stream["matrix"],
            labels=stream["experience_labels"],
        )
        md += [
            "## Continual learning on the device",
            "",
            f"ACC {stream['acc']:.3f}, BWT {stream['bwt']:+.3f}, average forgetting "
            f"{stream['avg_forgetting']:.3f} ({stream.get('strategy', '')}, "
            f"{stream.get('samples', 0)} samples; {markdown_text(stream.get('scenario', ''))}).",
            "",
            "![Prequential accuracy over the stream; dashed lines mark new experiences]"
            "(plots/stream_accuracy.png)",
            "",
            "![Accuracy matrix: rows after each experience, columns the experience tested]"
            "(plots/accuracy_matrix.png)",
            "",
        ]
    federated = figures.get("federated")
    if federated:
        rounds = federated["rounds"]
        plots["federated"] = plot_federated_rounds(root / "plots" / "federated_rounds.png", rounds=rounds)
        md += [
            "## Federated simulation",
            "",
            f"{federated.get('clients')} devices, {len(rounds)} rounds, scheme `{federated.get('scheme')}`, "
            f"partition {markdown_text(federated.get('partition'))}.",
            "",
            "![Bytes per federated round (bars) and global accuracy (line)](plots/federated_rounds.png)",
            "",
            _table(
                ["round", "accuracy", "bytes down", "bytes up"],
                [
                    [
                        r["round"],
                        "-" if r.get("accuracy") is None else f"{r['accuracy']:.3f}",
                        f"{r['bytes_down']:,}",
                        f"{r['bytes_up']:,}",
                    ]
                    for r in rounds
                ],
            ),
            "",
        ]
    markdown = "\n".join(md) + "\n"
    md_path = atomic_write_bytes(root / "index.md", markdown.encode())
    html_path = atomic_write_bytes(root / "index.html", _markdown_to_html(markdown, title).encode())
    json_path = atomic_write_bytes(
        root / "figures.json", json.dumps(figures, indent=2, sort_keys=True, default=str).encode()
    )
    logger.info("wrote the report to %s", root)
    return ReportFiles(root, md_path, html_path, json_path, plots)
