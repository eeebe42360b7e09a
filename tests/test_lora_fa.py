"""LoRA-FA (``LoRA(freeze_a=True)``): a frozen random ``A``, only ``B`` trains, less kept for backward."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import ondevice
from memory import estimate, measure
from ondevice.errors import ConfigError
from ondevice.schemes import SCHEME_VERSION, LoRA, Scheme
from ondevice.schemes.lora import LoRALinear


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))


def test_scheme_round_trips_without_a_version_bump() -> None:
    scheme = LoRA(rank=2, freeze_a=True)
    assert Scheme.from_dict(scheme.to_dict()) == scheme
    assert scheme.to_dict()["version"] == SCHEME_VERSION == 1
    old = {"name": "lora", "version": 1, "rank": 2}  # written before the field existed
    assert Scheme.from_dict(old) == LoRA(rank=2, freeze_a=False)
    with pytest.raises(ConfigError, match=r"LoRA\.freeze_a must be a bool"):
        LoRA(freeze_a=1)  # type: ignore[arg-type]


def test_only_b_trains_and_a_is_random_and_reproducible() -> None:
    prepared = ondevice.prepare(_mlp(), LoRA(rank=4, freeze_a=True))
    trainable = prepared.trainable_parameters()
    assert any(".lora_B." in n for n in trainable) and not any(".lora_A." in n for n in trainable)
    again = ondevice.prepare(_mlp(), LoRA(rank=4, freeze_a=True))
    for (name, module), (_, other) in zip(
        prepared.model.named_modules(), again.model.named_modules(), strict=True
    ):
        if isinstance(module, LoRALinear):
            assert module.lora_A.weight.abs().sum() > 0, name  # random, not zero
            assert torch.equal(module.lora_A.weight, other.lora_A.weight), name  # same on every device
    x = torch.randn(4, 64)
    assert torch.equal(prepared(x), _mlp()(x))  # B starts at zero


def test_gradients_of_b_match_plain_lora() -> None:
    x, target = torch.randn(8, 64), torch.randint(0, 10, (8,))
    grads = []
    for freeze_a in (False, True):
        prepared = ondevice.prepare(_mlp(), LoRA(rank=4, freeze_a=freeze_a))
        for module in prepared.model.modules():  # same A, non-zero B, so B's gradient depends on A
            if isinstance(module, LoRALinear):
                generator = torch.Generator().manual_seed(1)
                with torch.no_grad():
                    module.lora_A.weight.copy_(torch.randn(module.lora_A.weight.shape, generator=generator))
                    module.lora_B.weight.copy_(torch.randn(module.lora_B.weight.shape, generator=generator))
        nn.functional.cross_entropy(prepared(x), target).backward()
        grads.append({n: p.grad for n, p in prepared.trainable_parameters().items() if ".lora_B." in n})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-6)


def test_keeps_only_the_rank_r_hidden() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 256), nn.GELU(), nn.Linear(256, 256), nn.GELU(), nn.Linear(256, 10))
    x = torch.randn(32, 256)
    kept = {}
    for freeze_a in (False, True):
        prepared = ondevice.prepare(model, LoRA(rank=4, freeze_a=freeze_a, train_classifier=False))
        kept[freeze_a] = measure(prepared, x).activation_bytes
        assert estimate(prepared, tuple(x.shape)).activation_bytes == kept[freeze_a]
    # Each adapted layer's input (32 x 256 floats) is no longer kept; the rank-4 hiddens still are.
    assert kept[False] - kept[True] == 2 * 32 * 256 * 4
    assert kept[False] / kept[True] > 1.3
