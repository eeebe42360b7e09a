"""prepare() on the models users bring: transformers, timm and torchvision models, their own code.

Every model is accepted for every scheme that fits it, and a prepared model's gradients equal those of the
same model prepared on stock PyTorch (``memory_saving=False``), relative 1e-5, dropout off.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch.nn import functional as F

from bench.library_models import LIBRARY_MODELS, LibraryModel, library_available, logits_of
from ondevice import ConfigError, InputDtypeError, PreparedModel, Trainer, prepare

pytestmark = pytest.mark.skipif(
    not all(library_available(lib) for lib in ("transformers", "timm", "torchvision")),
    reason="the dev extra's transformers, timm and torchvision are not installed",
)


def schemes_for(spec: LibraryModel) -> list[str]:
    """The schemes that fit a model: bias, last_layer and sparse; then lite_residual (CNNs) or lora."""
    return ["bias", "last_layer", "sparse", "lite_residual" if spec.kind == "cnn" else "lora"]


CASES = [(name, scheme) for name, spec in LIBRARY_MODELS.items() for scheme in schemes_for(spec)]


def prepared_pair(spec: LibraryModel, scheme: str) -> tuple[PreparedModel, PreparedModel]:
    model = spec.build(seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # layers on stock autograd are reported; not what this checks
        torch.manual_seed(1)  # added branches/adapters start the same in both
        ours = prepare(model, scheme)
        torch.manual_seed(1)
        stock = prepare(model, scheme, memory_saving=False)
    return ours, stock


def step_gradients(prepared: PreparedModel, spec: LibraryModel) -> dict[str, torch.Tensor]:
    x, y = spec.example(2), spec.targets(2)
    prepared.train()
    for module in prepared.modules():  # dropout and stochastic depth off: both runs must see one network
        if isinstance(module, torch.nn.Dropout) or type(module).__name__ in ("StochasticDepth", "DropPath"):
            module.eval()
    loss = F.cross_entropy(logits_of(prepared(x)), y)
    loss.backward()
    return {name: p.grad.clone() for name, p in prepared.trainable_parameters().items() if p.grad is not None}


@pytest.mark.slow
@pytest.mark.parametrize(("name", "scheme"), CASES, ids=[f"{n}-{s}" for n, s in CASES])
def test_library_models_are_accepted_and_train_with_stock_gradients(name: str, scheme: str) -> None:
    spec = LIBRARY_MODELS[name]
    ours, stock = prepared_pair(spec, scheme)
    if scheme == "lite_residual":
        plan = ours.report.lite_residual
        assert plan is not None and plan.targets and 0 < plan.share <= 0.25
        assert plan.branch_params == ours.report.added_params
    assert ours.report.trainable_names == stock.report.trainable_names
    assert ours.report.trainable_params > 0
    with torch.no_grad():
        ours.eval(), stock.eval()
        x = spec.example(2)
        torch.testing.assert_close(logits_of(ours(x)), logits_of(stock(x)), rtol=1e-5, atol=1e-5)
    got, want = step_gradients(ours, spec), step_gradients(stock, spec)
    assert set(got) == set(want) and want
    # Relative 1e-5, with float noise judged against the largest gradient of the step (a gradient that is
    # all but zero, e.g. behind a freshly initialised network, is compared in absolute terms).
    scale = max(float(g.abs().max()) for g in want.values()) or 1.0
    for tensor_name, reference in want.items():
        torch.testing.assert_close(
            got[tensor_name],
            reference,
            rtol=1e-5,
            atol=1e-5 * scale,
            msg=lambda m, n=tensor_name: f"{n}: {m}",
        )


@pytest.mark.parametrize(
    "name", ["transformers/bert", "transformers/vit", "timm/vit_tiny", "torchvision/vit"]
)
def test_lite_residual_on_a_model_without_convolutions_names_the_schemes_that_fit(name: str) -> None:
    spec = LIBRARY_MODELS[name]
    model = spec.build()  # a ViT's only convolution is its patch embedding, which is no residual block
    with pytest.raises(ConfigError, match=r"'bias'.*'lora'|'lora'.*'bias'"):
        prepare(model, "lite_residual")


def test_a_text_model_takes_token_ids_and_says_so_when_given_floats() -> None:
    spec = LIBRARY_MODELS["transformers/bert"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = prepare(spec.build(), "bias")
    assert prepared.input_spec.token_ids
    with pytest.raises(InputDtypeError, match=r"integer token ids, got torch.float32.*x.long\(\)"):
        prepared(torch.randn(2, 16))


@pytest.mark.parametrize("name", ["transformers/bert", "transformers/mobilenetv2"])
def test_the_trainer_fits_a_transformers_model_through_its_model_output(name: str) -> None:
    spec = LIBRARY_MODELS[name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = prepare(spec.build(), "bias")
    trainer = Trainer(prepared, optimizer="adam", lr=3e-2)
    x, y = spec.example(8), spec.targets(8)
    first = trainer.step(x, y).loss
    for _ in range(40):
        last = trainer.step(x, y).loss
    assert first is not None and last is not None
    # The head and biases learn through the ModelOutput (a random-init CNN learns the class prior at least).
    assert last < 0.8 * first


def test_sparse_finds_the_norm_shift_after_a_bias_free_conv_in_every_library() -> None:
    # timm's BatchNormAct2d holds its activation as a child: it is still the norm right after the conv.
    counts = {}
    for name in ("timm/mobilenetv2_100", "torchvision/mobilenet_v2", "transformers/mobilenetv2"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            prepared = prepare(LIBRARY_MODELS[name].build(), "sparse")
        names = prepared.report.trainable_names
        counts[name] = sum(1 for n in names if n.endswith(".bias"))
    assert len(set(counts.values())) == 1 and counts["timm/mobilenetv2_100"] > 20, counts
