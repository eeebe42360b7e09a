from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest

from federated.config import FederatedConfig
from ondevice.errors import ConfigError, UnknownNameError
from ondevice.schemes import LiteResidual


def test_round_trips() -> None:
    config = FederatedConfig(
        scheme=LiteResidual(expand=0.25), partition="dirichlet:0.30", compression="topk:0.1"
    )
    assert config.partition == "dirichlet:0.3"
    assert FederatedConfig.from_dict(config.to_dict()) == config
    assert FederatedConfig.from_json(config.to_json()) == config
    run_config = config.to_run_config()
    assert all(isinstance(v, str | int | float | bool) for v in run_config.values())
    assert FederatedConfig.from_run_config(run_config) == config
    json.dumps(config.to_dict())


def test_run_config_accepts_scheme_names_and_int_lr() -> None:
    config = FederatedConfig.from_run_config(
        {"scheme": "bias", "lr": 1, "rounds": 2, "server-lr": 2, "server-momentum": 0, "unrelated": "x"}
    )
    assert config.scheme["name"] == "bias" and config.lr == 1.0 and config.rounds == 2
    assert isinstance(config.server_lr, float) and config.server_lr == 2.0
    assert isinstance(config.server_momentum, float) and config.server_momentum == 0.0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"rounds": 0}, "rounds"),
        ({"aggregation": "fedprox"}, "proximal_mu"),
        ({"proximal_mu": 0.1}, "proximal_mu"),
        ({"classes": (1, 1)}, "classes"),
        ({"fraction_train": 0.0}, "fraction_train"),
        ({"norm_factor": 1.0}, "norm_factor"),
        ({"partition": "zipf"}, "partition"),
        ({"compression": "zip"}, "compression"),
        ({"scheme": "nope"}, "scheme"),
        ({"downlink": "fp8"}, "downlink"),
        ({"strategy": "forget"}, "strategy"),
        ({"buffer_size": 0}, "buffer_size"),
        ({"aggregation": "fedprox", "proximal_mu": 0.1, "strategy": "lwf"}, "fedprox"),
        ({"server_momentum": 1.0}, r"server_momentum must be in \[0, 1\)"),
        ({"server_momentum": -0.5}, "server_momentum"),
        ({"server_lr": 0}, "server_lr must be a number > 0"),
    ],
)
def test_invalid(kwargs: dict, match: str) -> None:
    with pytest.raises((ConfigError, UnknownNameError), match=match):
        FederatedConfig(**kwargs)


def test_from_dict_rejects_unknown_fields() -> None:
    with pytest.raises(ConfigError, match="no field"):
        FederatedConfig.from_dict({"epochs": 3})


def test_the_example_app_lists_every_field_and_its_default() -> None:
    """examples/federated_app/pyproject.toml says it holds every key: it must, and parse to a valid config."""
    path = Path(__file__).resolve().parents[2] / "examples" / "federated_app" / "pyproject.toml"
    app_config = tomllib.loads(path.read_text())["tool"]["flwr"]["app"]["config"]
    expected = set(FederatedConfig().to_run_config())
    missing = sorted(expected - set(app_config))
    assert not missing, f"{path} lacks {missing}"
    config = FederatedConfig.from_run_config(app_config)
    assert config.classes == tuple(range(10)) and config.pretrain_classes == (0, 1, 2, 3, 4)
    assert config.server_lr == 1.0 and config.server_momentum == 0.0
