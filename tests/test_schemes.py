"""Update schemes: JSON round trips, name resolution, validation messages."""

from __future__ import annotations

import json

import pytest

from ondevice import ConfigError, UnknownSchemeError
from ondevice.schemes import (
    SCHEME_VERSION,
    Bias,
    Full,
    LastLayer,
    LiteResidual,
    LoRA,
    Scheme,
    Sparse,
    list_schemes,
    register_scheme,
    resolve_scheme,
)

ALL = [
    Full(),
    LastLayer(),
    Bias(),
    LiteResidual(),
    LiteResidual(expand=0.5, kernel_size=3, groups=4, downsample=1, norm="batch", targets=("a.b",)),
    Sparse(),
    Sparse(bias_last_k=22, weight_layers=(21, -1, "features.3"), channel_ratios=(1.0, 0.125, 0.25)),
    LoRA(),
    LoRA(rank=2, alpha=4, targets=("blocks.0.qkv",), train_bias=True, train_classifier=False),
]


@pytest.mark.parametrize("scheme", ALL, ids=lambda s: s.to_json())
def test_json_round_trip(scheme: Scheme) -> None:
    text = scheme.to_json()
    payload = json.loads(text)
    assert payload["name"] == scheme.name and payload["version"] == SCHEME_VERSION
    assert Scheme.from_json(text) == scheme
    assert resolve_scheme(payload) == scheme
    hash(scheme)  # frozen dataclasses are hashable


def test_names_resolve_to_default_objects() -> None:
    assert list_schemes() == ["bias", "full", "last_layer", "lite_residual", "lora", "sparse"]
    for name in list_schemes():
        resolved = resolve_scheme(name)
        assert resolved.name == name
        assert resolve_scheme(resolved) is resolved
    assert resolve_scheme("full").update_norm_stats is True
    assert resolve_scheme("bias").update_norm_stats is False


def test_unknown_name_lists_valid_ones() -> None:
    with pytest.raises(UnknownSchemeError, match=r"unknown scheme 'biases'.*'bias', 'full'.*'sparse'"):
        resolve_scheme("biases")
    with pytest.raises(ValueError):  # the builtin family still catches it
        resolve_scheme({"name": "nope"})


@pytest.mark.parametrize(
    ("factory", "message"),
    [
        (lambda: LiteResidual(kernel_size=4), "kernel_size must be odd"),
        (lambda: LiteResidual(groups=0), "groups must be a positive int"),
        (lambda: LiteResidual(norm="layer"), "norm must be 'group' or 'batch'"),
        (lambda: LiteResidual(expand=-1.0), "expand must be a positive number"),
        (lambda: LiteResidual(targets=["a"]), "targets must be a tuple"),
        (lambda: Sparse(bias_last_k=-1), "bias_last_k must be None or an int >= 0"),
        (
            lambda: Sparse(weight_layers=(1, 2), channel_ratios=(0.5,)),
            "has 1 entries but weight_layers has 2",
        ),
        (lambda: Sparse(weight_layers=(1,), channel_ratios=(0.0,)), r"must be in \(0, 1\]"),
        (lambda: Sparse(weight_layers=(True,), channel_ratios=()), "tuple of ints or names"),
        (lambda: LoRA(rank=0), "rank must be a positive int"),
        (lambda: LoRA(alpha=0), "alpha must be a positive number"),
        (lambda: Bias(update_norm_stats="yes"), "update_norm_stats must be a bool"),
    ],
)
def test_invalid_fields_are_named(factory: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        factory()  # type: ignore[operator]


def test_from_dict_rejects_unknown_fields_and_versions() -> None:
    with pytest.raises(ConfigError, match=r"no field\(s\) \['rnak'\]"):
        Scheme.from_dict({"name": "lora", "rnak": 3})
    with pytest.raises(ConfigError, match="scheme version 99"):
        Scheme.from_dict({"name": "bias", "version": 99})
    with pytest.raises(ConfigError, match="does not parse"):
        Scheme.from_json("{not json")
    with pytest.raises(ConfigError, match="must be a Scheme, a name or a dict"):
        resolve_scheme(3)  # type: ignore[arg-type]


def test_duplicate_registration_is_an_error() -> None:
    with pytest.raises(ConfigError, match="already registered"):
        register_scheme(Bias)


def test_sparse_defaults_scale_with_the_model() -> None:
    scheme = Sparse()
    assert scheme.bias_layers(10) == 5 and scheme.bias_layers(7) == 4
    assert Sparse(bias_last_k=3).bias_layers(10) == 3
    assert scheme.ratios() == (1.0,)
    assert Sparse(weight_layers=(1, 2), channel_ratios=()).ratios() == (1.0, 1.0)
