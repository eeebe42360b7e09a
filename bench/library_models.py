"""Real models from transformers, timm and torchvision, built from small configs (no downloads).

The tests, ``bench/memory.py`` and ``bench/cuda_check.py`` use these to try ondevice on the models users
bring: the libraries' own model code, not copies. Each entry builds a fresh, randomly initialised model
(seeded), makes an example batch and picks the logits out of whatever the model returns.

torchvision's compiled detection ops (``torchvision/_C.so``) link against the CUDA build of torch and do
not load beside the CPU wheel this project pins; its model code is plain Python and does not use them.
:func:`import_torchvision` imports torchvision so that, when ``_C`` cannot load, only the fake-tensor
registrations of those ops are skipped (they would fail for an operator that was never defined): the
classification models work, and calling a detection op raises torch's own "no such operator" error.
transformers and timm import torchvision when it is installed, so it is imported this way first for
them too. Where ``_C`` loads (a GPU machine with the matching torch), torchvision is imported unchanged.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

__all__ = ["LIBRARY_MODELS", "LibraryModel", "import_torchvision", "library_available", "logits_of"]

Kind = Literal["cnn", "vision-transformer", "text-transformer"]


def _torchvision_extension_loads() -> bool:
    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        return False
    libraries = sorted(Path(spec.origin).parent.glob("_C*.so")) + sorted(
        Path(spec.origin).parent.glob("_C*.pyd")
    )
    if not libraries:
        return False
    try:
        torch.ops.load_library(str(libraries[0]))
    except (OSError, RuntimeError):
        return False
    return True


def import_torchvision() -> types.ModuleType:
    """``import torchvision``, skipping its fake-op registrations when its compiled ops cannot load."""
    if "torchvision" in sys.modules:
        return sys.modules["torchvision"]
    if importlib.util.find_spec("torchvision") is None:
        raise ImportError("torchvision is not installed; install the project's dev extra")
    name = "torchvision._meta_registrations"
    if not _torchvision_extension_loads() and name not in sys.modules:
        sys.modules[name] = types.ModuleType(name, "skipped: torchvision's compiled ops did not load")
    return importlib.import_module("torchvision")


def _prepare_imports() -> None:
    """transformers and timm import torchvision when it is installed: import it first, as above."""
    if importlib.util.find_spec("torchvision") is not None:
        import_torchvision()


def library_available(library: str) -> bool:
    """Whether ``library`` (transformers, timm or torchvision) can be imported here."""
    try:
        _prepare_imports()
        importlib.import_module(library)
    except ImportError:
        return False
    return True


def logits_of(output: Any) -> Tensor:
    """The logits of a model output: a tensor, or a transformers ``ModelOutput`` with ``logits``."""
    if isinstance(output, Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    raise TypeError(f"cannot find logits in a {type(output).__name__}")


@dataclass(frozen=True)
class LibraryModel:
    """One library model: how to build it and feed it.

    Attributes:
        name: ``library/model``, e.g. ``"timm/mobilenetv2_100"``.
        library: the package whose code the model is (``transformers``, ``timm`` or ``torchvision``).
        kind: ``"cnn"``, ``"vision-transformer"`` or ``"text-transformer"`` (which schemes fit).
        family: for the saving figures: ``"mobilenetv2"``, ``"resnet"``, ``"efficientnet"``,
            ``"convnext"``, ``"mobilenetv3"``, ``"vit"``, ``"bert"``, ``"gpt2"``.
        classes: output classes of the head.
    """

    name: str
    library: str
    kind: Kind
    family: str
    build_fn: Callable[[], nn.Module]
    classes: int = 10
    resolution: int = 64
    sequence: int = 16
    vocab: int = 100

    def build(self, seed: int = 0) -> nn.Module:
        """A fresh model in eval mode (dropout off), initialised from ``seed``."""
        _prepare_imports()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = self.build_fn()
        return model.eval()

    def example(self, batch: int = 4, *, seed: int = 0, device: str | torch.device = "cpu") -> Tensor:
        """An input batch: images ``batch x 3 x R x R`` or token ids ``batch x sequence``."""
        generator = torch.Generator().manual_seed(seed)
        if self.kind == "text-transformer":
            ids = torch.randint(1, self.vocab, (batch, self.sequence), generator=generator)
            return ids.to(device)
        shape = (batch, 3, self.resolution, self.resolution)
        return torch.randn(shape, generator=generator).to(device)

    def targets(self, batch: int = 4, *, seed: int = 0, device: str | torch.device = "cpu") -> Tensor:
        """Class labels for :meth:`example`."""
        generator = torch.Generator().manual_seed(seed + 1)
        return torch.randint(0, self.classes, (batch,), generator=generator).to(device)


def _hf(config_name: str, model_name: str, **config: Any) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        transformers = importlib.import_module("transformers")
        cfg = getattr(transformers, config_name)(**config)
        return getattr(transformers, model_name)(cfg)

    return build


def _timm(name: str, **kwargs: Any) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        timm = importlib.import_module("timm")
        return timm.create_model(name, pretrained=False, **kwargs)

    return build


def _tv(name: str, **kwargs: Any) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        models = import_torchvision().models
        return getattr(models, name)(weights=None, **kwargs)

    return build


def _tv_vit() -> nn.Module:
    models = import_torchvision().models
    return models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=64, mlp_dim=128, num_classes=10
    )


_TEXT = {"vocab_size": 100, "num_labels": 3}
LIBRARY_MODELS: dict[str, LibraryModel] = {
    m.name: m
    for m in (
        # transformers
        LibraryModel(
            "transformers/bert",
            "transformers",
            "text-transformer",
            "bert",
            _hf(
                "BertConfig",
                "BertForSequenceClassification",
                hidden_size=64,
                num_hidden_layers=2,
                num_attention_heads=2,
                intermediate_size=128,
                hidden_dropout_prob=0.0,
                attention_probs_dropout_prob=0.0,
                **_TEXT,
            ),
            classes=3,
        ),
        LibraryModel(
            "transformers/gpt2",
            "transformers",
            "text-transformer",
            "gpt2",
            _hf(
                "GPT2Config",
                "GPT2ForSequenceClassification",
                n_embd=64,
                n_layer=2,
                n_head=2,
                n_positions=64,
                pad_token_id=0,
                bos_token_id=1,
                eos_token_id=2,
                resid_pdrop=0.0,
                embd_pdrop=0.0,
                attn_pdrop=0.0,
                **_TEXT,
            ),
            classes=3,
        ),
        LibraryModel(
            "transformers/vit",
            "transformers",
            "vision-transformer",
            "vit",
            _hf(
                "ViTConfig",
                "ViTForImageClassification",
                image_size=32,
                patch_size=8,
                hidden_size=64,
                num_hidden_layers=2,
                num_attention_heads=2,
                intermediate_size=128,
                hidden_dropout_prob=0.0,
                attention_probs_dropout_prob=0.0,
                num_labels=10,
            ),
            resolution=32,
        ),
        LibraryModel(
            "transformers/mobilenetv2",
            "transformers",
            "cnn",
            "mobilenetv2",
            _hf(
                "MobileNetV2Config",
                "MobileNetV2ForImageClassification",
                image_size=64,
                classifier_dropout_prob=0.0,
                num_labels=10,
            ),
        ),
        LibraryModel(
            "transformers/resnet",
            "transformers",
            "cnn",
            "resnet",
            _hf(
                "ResNetConfig",
                "ResNetForImageClassification",
                layer_type="basic",
                depths=[2, 2, 2, 2],
                hidden_sizes=[64, 128, 256, 512],
                embedding_size=64,
                num_labels=10,
            ),
        ),
        LibraryModel(
            "transformers/efficientnet",
            "transformers",
            "cnn",
            "efficientnet",
            _hf(
                "EfficientNetConfig",
                "EfficientNetForImageClassification",
                image_size=64,
                width_coefficient=1.0,
                depth_coefficient=1.0,
                hidden_dim=1280,
                dropout_rate=0.0,
                drop_connect_rate=0.0,
                num_labels=10,
            ),
        ),
        LibraryModel(
            "transformers/convnext",
            "transformers",
            "cnn",
            "convnext",
            _hf(
                "ConvNextConfig",
                "ConvNextForImageClassification",
                hidden_sizes=[40, 80, 160, 320],
                depths=[2, 2, 2, 2],
                drop_path_rate=0.0,
                num_labels=10,
            ),
        ),
        # timm
        LibraryModel(
            "timm/mobilenetv2_100", "timm", "cnn", "mobilenetv2", _timm("mobilenetv2_100", num_classes=10)
        ),
        LibraryModel(
            "timm/efficientnet_b0", "timm", "cnn", "efficientnet", _timm("efficientnet_b0", num_classes=10)
        ),
        LibraryModel("timm/resnet18", "timm", "cnn", "resnet", _timm("resnet18", num_classes=10)),
        LibraryModel(
            "timm/mobilenetv3_small_100",
            "timm",
            "cnn",
            "mobilenetv3",
            _timm("mobilenetv3_small_100", num_classes=10),
        ),
        LibraryModel("timm/convnext_atto", "timm", "cnn", "convnext", _timm("convnext_atto", num_classes=10)),
        LibraryModel(
            "timm/vit_tiny",
            "timm",
            "vision-transformer",
            "vit",
            _timm("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, num_classes=10),
            resolution=32,
        ),
        # torchvision
        LibraryModel(
            "torchvision/mobilenet_v2",
            "torchvision",
            "cnn",
            "mobilenetv2",
            _tv("mobilenet_v2", num_classes=10),
        ),
        LibraryModel("torchvision/resnet18", "torchvision", "cnn", "resnet", _tv("resnet18", num_classes=10)),
        LibraryModel(
            "torchvision/mobilenet_v3_small",
            "torchvision",
            "cnn",
            "mobilenetv3",
            _tv("mobilenet_v3_small", num_classes=10),
        ),
        LibraryModel(
            "torchvision/efficientnet_b0",
            "torchvision",
            "cnn",
            "efficientnet",
            _tv("efficientnet_b0", num_classes=10),
        ),
        LibraryModel("torchvision/vit", "torchvision", "vision-transformer", "vit", _tv_vit, resolution=32),
    )
}
"""Every library model by name, in a fixed order."""
