"""run_transfer and ``ondevice transfer`` with prepare's modes: 2-bit derivatives and recomputation."""

from __future__ import annotations

import json
from typing import Any

import pytest
from typer.testing import CliRunner

from memory.transfer import run_transfer
from ondevice.cli import app
from ondevice.errors import ConfigError

runner = CliRunner()
SMALL_VIT: dict[str, Any] = {"image_size": 8, "patch_size": 4, "dim": 16, "depth": 2, "heads": 2}


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"compress": "int4"}, r"compress must be None, 'int8' or '2bit', got 'int4'"),
        ({"recompute": "features.blocks.0"}, "recompute must be True, False or a tuple of block names"),
        ({"recompute": (1,)}, "recompute must be True, False or a tuple of block names"),
    ],
)
def test_bad_modes_are_refused_before_any_training(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        run_transfer("no-such-model", schemes=("bias",), **kwargs)  # type: ignore[arg-type]


def test_unknown_blocks_are_refused_with_the_blocks_there_are() -> None:
    with pytest.raises(ConfigError, match=r"not a submodule of ViT; its blocks are \['features.blocks.0'"):
        run_transfer("vit", schemes=("bias",), epochs=1, recompute=("features.nope",), **SMALL_VIT)


def test_2bit_and_recompute_apply_to_a_vit_and_keep_less() -> None:
    plain = run_transfer("vit", schemes=("bias",), epochs=1, **SMALL_VIT).outcome("bias")
    packed = run_transfer("vit", schemes=("bias",), epochs=1, compress="2bit", **SMALL_VIT)
    recomputed = run_transfer("vit", schemes=("bias",), epochs=1, recompute=True, **SMALL_VIT)
    assert packed.compress == "2bit" and packed.outcome("bias").compress == "2bit"
    assert recomputed.recompute is True and recomputed.outcome("bias").recomputed_blocks == (
        "features.blocks.0",
        "features.blocks.1",
    )
    assert packed.mode_notes() == () and recomputed.mode_notes() == ()
    assert plain.compress is None and plain.recomputed_blocks == ()
    assert plain.activation_bytes is not None
    for result in (packed, recomputed):
        kept = result.outcome("bias").activation_bytes
        assert kept is not None and 0 < kept < plain.activation_bytes
        assert 0.0 < result.outcome("bias").accuracy <= 1.0
    assert recomputed.to_dict()["outcomes"][0]["recomputed_blocks"] == [
        "features.blocks.0",
        "features.blocks.1",
    ]


def test_2bit_on_a_relu_network_changes_nothing_and_says_so() -> None:
    plain = run_transfer("cnn", schemes=("last_layer",), epochs=1)
    with pytest.warns(UserWarning, match="nothing is compressed"):
        packed = run_transfer("cnn", schemes=("last_layer",), epochs=1, compress="2bit")
    before, after = plain.outcome("last_layer"), packed.outcome("last_layer")
    assert after.compress is None and after.accuracy == before.accuracy
    assert after.activation_bytes == before.activation_bytes
    (note,) = packed.mode_notes()
    assert "compress='2bit' changed nothing in cnn under last_layer" in note
    assert packed.to_dict()["mode_notes"] == [note]


def test_cli_transfer_takes_2bit_and_recompute_and_reports_what_applied() -> None:
    args = ["transfer", "--quick", "--json", "--schemes", "bias", "--compress", "2bit", "--recompute"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["compress"] == "2bit" and payload["recompute"] is True
    (outcome,) = payload["outcomes"]
    assert outcome["compress"] is None  # the zoo CNN is a ReLU network
    assert outcome["recomputed_blocks"] == ["features.0", "features.1", "features.2"]
    assert len(payload["mode_notes"]) == 1 and "compress='2bit' changed nothing" in payload["mode_notes"][0]

    result = runner.invoke(app, ["transfer", "--quick", "--schemes", "bias", "--compress", "2bit"])
    assert result.exit_code == 0, result.output
    assert "note: compress='2bit' changed nothing in cnn" in " ".join(result.output.split())
