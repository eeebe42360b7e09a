"""Pretrained backbones without downloads: train a zoo model on the shipped digits once, then cache it.

``pretrain("cnn")`` builds ``create_model("cnn", num_classes=5)``, trains it on the digits 0-4 (laid out
to the model's ``input_shape``: resized, channels repeated, or scanned into a sequence) and stores the
``state_dict`` as ``<cache>/pretrained/<model>-<hash>.safetensors``, a checkpoint of kind
``pretrained-backbone`` (:mod:`ondevice.checkpoint`: digest-checked) with its provenance in the metadata.
The next call with the same arguments loads the file instead of training; a damaged, outdated or foreign
file is a miss, retrained and rewritten. The cache directory is ``cache_dir``, else
``$ONDEVICE_CACHE_DIR``, else ``~/.cache/ondevice``. :func:`pretrain_backbone` trains on the caller's
data (the continual scenarios' factory pools) through the same loop (:func:`ondevice.loop.train_epochs`)
and the same cache.

Recipe (version :data:`RECIPE_VERSION`): AdamW (weight decay 1e-4) with a one-cycle schedule (15 %
warm-up, cosine decay) at a per-model peak learning rate and epoch count (:data:`RECIPES`), batch 32,
cross-entropy with label smoothing 0.05, light augmentation (images: random rotation of up to 10 degrees
and shifts of up to 1/8 of the side; sequences: amplitude jitter and noise). The last BatchNorm scale of
every residual inverted bottleneck starts at zero ("zero-init residual", Goyal et al. 2017), which makes
the deep MobileNetV2/MCUNet converge in a few epochs on 700 images; training updates it like any other
weight. The train/test split is :func:`ondevice.data.stratified_split` with the same ``seed``, so the
source test set is exactly ``transfer_split(..., seed=seed).source_test``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ondevice.checkpoint import KIND_PRETRAINED_BACKBONE, read_tensors, write_tensors
from ondevice.data.digits import load_digits
from ondevice.data.splits import stratified_split
from ondevice.data.tensordata import TensorData
from ondevice.errors import CheckpointError, ConfigError
from ondevice.loop import EpochRecipe, train_epochs
from ondevice.models import ClassifierModel, InvertedResidual, create_model, model_defaults

__all__ = [
    "DEFAULT_EPOCHS",
    "FALLBACK_RECIPE",
    "RECIPES",
    "RECIPE_VERSION",
    "PretrainResult",
    "Recipe",
    "data_digest",
    "default_cache_dir",
    "pretrain",
    "pretrain_backbone",
    "pretrain_with_report",
    "pretrained_path",
]

logger = logging.getLogger(__name__)

#: Bump when the training recipe changes, so that old cache entries are not reused.
RECIPE_VERSION = 2


@dataclass(frozen=True)
class Recipe:
    """Per-model training settings: default epochs and peak learning rate."""

    epochs: int
    lr: float


#: Recipe per registered model name; other (user-registered) models get :data:`FALLBACK_RECIPE`.
RECIPES: dict[str, Recipe] = {
    "cnn": Recipe(epochs=15, lr=3e-3),
    "cnn1d": Recipe(epochs=20, lr=3e-3),
    "mcunet": Recipe(epochs=8, lr=1e-2),
    "mobilenetv2": Recipe(epochs=10, lr=1e-2),
    "vit": Recipe(epochs=40, lr=3e-3),
}
FALLBACK_RECIPE = Recipe(epochs=15, lr=3e-3)
#: Default epochs per model (from :data:`RECIPES`).
DEFAULT_EPOCHS: dict[str, int] = {name: r.epochs for name, r in RECIPES.items()}
_BATCH_SIZE = 32
_WEIGHT_DECAY = 1e-4
_LABEL_SMOOTHING = 0.05
_TEST_FRACTION = 0.25
_WARMUP = 0.15


@dataclass(frozen=True, eq=False)
class PretrainResult:
    """A pretrained model and how it came to be.

    Attributes:
        model: the trained model, in eval mode.
        source_accuracy: top-1 accuracy on the held-out 25 % of the source classes' digits.
        cached: True when the weights were loaded from the cache rather than trained now.
        path: the cache file.
        epochs: epochs trained.
        train_time_s: seconds the training took (when it was trained, possibly in an earlier run).
    """

    model: ClassifierModel
    source_accuracy: float
    cached: bool
    path: Path
    epochs: int
    train_time_s: float


def default_cache_dir() -> Path:
    """``$ONDEVICE_CACHE_DIR`` if set, else ``~/.cache/ondevice``."""
    env = os.environ.get("ONDEVICE_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "ondevice"


def _check_classes(classes: Sequence[int]) -> tuple[int, ...]:
    if isinstance(classes, str) or not isinstance(classes, Sequence) or len(classes) < 2:
        raise ConfigError(f"classes must list at least two digit labels (0-9), got {classes!r}")
    out = tuple(int(c) for c in classes)
    if len(set(out)) != len(out) or not all(0 <= c <= 9 for c in out):
        raise ConfigError(f"classes must be distinct digit labels in 0..9, got {out}")
    return out


def _resolve(
    model: str, classes: Sequence[int], epochs: int | None, model_kwargs: dict[str, Any]
) -> tuple[tuple[int, ...], int, dict[str, Any]]:
    cls = _check_classes(classes)
    if "num_classes" in model_kwargs:
        raise ConfigError("pretrain sets num_classes from classes; pass classes=... instead of num_classes")
    defaults = model_defaults(model)  # raises UnknownModelError for unknown names
    unknown = sorted(set(model_kwargs) - set(defaults))
    if unknown:
        raise ConfigError(
            f"model {model!r} got unknown argument(s) {', '.join(unknown)}; it accepts: "
            f"{', '.join(sorted(defaults))}"
        )
    if epochs is None:
        epochs = RECIPES.get(model, FALLBACK_RECIPE).epochs
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ConfigError(f"epochs must be a positive int or None (recipe default), got {epochs!r}")
    full = {k: v for k, v in {**defaults, **model_kwargs}.items() if k != "num_classes"}
    return cls, epochs, full


def _cache_path(cache_dir: str | os.PathLike[str] | None, model: str, spec: dict[str, Any]) -> Path:
    """``<cache>/pretrained/<model>-<hash of spec>.safetensors``."""
    try:
        text = json.dumps(spec, sort_keys=True, separators=(",", ":"))
    except TypeError as exc:
        raise ConfigError(
            f"pretraining needs JSON-serialisable model arguments to key its cache: {exc}"
        ) from None
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return root / "pretrained" / f"{model}-{hashlib.sha256(text.encode()).hexdigest()[:16]}.safetensors"


def _digits_spec(
    model: str, classes: tuple[int, ...], epochs: int, seed: int, kwargs: dict[str, Any]
) -> dict[str, Any]:
    """What a digits-pretrained model depends on: its cache key and its provenance in the file."""
    return {
        "model": model,
        "model_kwargs": kwargs,
        "classes": list(classes),
        "seed": int(seed),
        "epochs": epochs,
        "recipe_version": RECIPE_VERSION,
    }


def pretrained_path(
    model: str,
    *,
    classes: Sequence[int] = (0, 1, 2, 3, 4),
    epochs: int | None = None,
    seed: int = 0,
    cache_dir: str | Path | None = None,
    **model_kwargs: Any,
) -> Path:
    """The cache file :func:`pretrain` uses for these arguments (it may not exist yet)."""
    cls, epochs, full = _resolve(model, classes, epochs, model_kwargs)
    return _cache_path(cache_dir, model, _digits_spec(model, cls, epochs, seed, full))


def _digits_for(input_shape: tuple[int, ...]) -> TensorData:
    if len(input_shape) == 3:
        channels, height, width = input_shape
        return load_digits(image_size=(height, width), channels=channels)
    if len(input_shape) == 2:
        channels, length = input_shape
        return load_digits(layout="sequence", length=length, channels=channels)
    raise ConfigError(
        f"pretrain handles image (C, H, W) and sequence (C, L) models, got input_shape {input_shape}"
    )


def _source_split(data: TensorData, classes: tuple[int, ...], seed: int) -> tuple[TensorData, TensorData]:
    train_idx, test_idx = stratified_split(data.y, test_fraction=_TEST_FRACTION, seed=seed)
    mapping = {c: i for i, c in enumerate(classes)}
    wanted = torch.tensor(classes)
    parts = []
    for idx in (train_idx, test_idx):
        part = data.subset(idx)
        parts.append(part.subset(torch.isin(part.y, wanted)).map_labels(mapping))
    return parts[0], parts[1]


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    n = x.shape[0]
    if x.dim() == 4:
        angle = (torch.rand(n, generator=gen) * 2 - 1) * math.radians(10.0)
        shift = (torch.rand(n, 2, generator=gen) * 2 - 1) * 0.25  # 1/8 of the side, in [-1, 1] units
        cos, sin = torch.cos(angle), torch.sin(angle)
        theta = torch.stack(
            [torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1
        )
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        fill = x.amin()
        return F.grid_sample(x - fill, grid, padding_mode="zeros", align_corners=False) + fill
    scale = 1 + (torch.rand(n, *([1] * (x.dim() - 1)), generator=gen) * 2 - 1) * 0.1
    return x * scale + 0.05 * torch.randn(x.shape, generator=gen)


@torch.no_grad()
def _accuracy(model: ClassifierModel, data: TensorData) -> float:
    model.eval()
    correct = 0
    for start in range(0, len(data), 256):
        logits = model(data.x[start : start + 256])
        correct += int((logits.argmax(1) == data.y[start : start + 256]).sum())
    return correct / max(1, len(data))


@contextlib.contextmanager
def _progress(enabled: bool, total: int, description: str) -> Iterator[Any]:
    if not enabled:
        yield lambda: None
        return
    from rich.progress import Progress

    with Progress(transient=True) as bar:
        task = bar.add_task(description, total=total)
        yield lambda: bar.advance(task)


def _zero_init_residuals(model: ClassifierModel) -> None:
    for block in model.modules():
        if isinstance(block, InvertedResidual) and block.use_residual:
            last = block.conv[-1]
            if isinstance(last, torch.nn.BatchNorm2d):
                torch.nn.init.zeros_(last.weight)


def data_digest(data: TensorData) -> str:
    """A short SHA-256 over ``data``'s inputs and labels (part of a cache key)."""
    digest = hashlib.sha256()
    for t in (data.x, data.y):
        digest.update(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


@dataclass(frozen=True)
class _Cached:
    model: ClassifierModel
    metadata: dict[str, Any]
    cached: bool


def _cached_training(
    path: Path,
    build: Callable[[], ClassifierModel],
    train: Callable[[ClassifierModel], dict[str, Any]],
    *,
    spec: dict[str, Any],
    seed: int,
) -> _Cached:
    """The one pretraining cache: load ``path`` into a model built by ``build`` after ``torch.manual_seed
    (seed)``, or train that model (``train`` returns metadata to keep) and write it to ``path``.

    Global RNG state is restored afterwards. A damaged, outdated or foreign entry is a miss: it is logged,
    removed and rewritten by the retrained model, which is trained from the same seed.
    """
    with torch.random.fork_rng(devices=[]):  # leave the caller's global RNG untouched
        torch.manual_seed(seed)
        net = build()
        if path.exists() or path.is_symlink():
            try:
                tensors, metadata = read_tensors(path, kind=KIND_PRETRAINED_BACKBONE)
                if metadata.get("spec") != json.loads(json.dumps(spec)):  # as JSON holds it
                    raise CheckpointError(f"{path} was trained with other settings ({metadata.get('spec')})")
                net.load_state_dict(tensors, strict=True)
            except (CheckpointError, RuntimeError) as exc:
                logger.warning("pretraining cache entry %s is unusable, retraining: %s", path, exc)
                _drop_cache_entry(path)
                torch.manual_seed(seed)
                net = build()
            else:
                net.eval()
                logger.info("loaded pretrained %s from %s", type(net).__name__, path)
                return _Cached(net, metadata, True)
        extra = train(net)
    net.eval()
    metadata = {"spec": spec, **extra}
    write_tensors(path, net.state_dict(), metadata, kind=KIND_PRETRAINED_BACKBONE)
    return _Cached(net, metadata, False)


def _drop_cache_entry(path: Path) -> None:
    """Remove an unusable cache entry so that the retrained model can be written in its place."""
    try:
        path.unlink(missing_ok=True)
    except OSError as exc:  # the write that follows then says what is in the way
        logger.warning("could not remove the unusable cache entry %s: %s", path, exc)


def pretrain_with_report(
    model: str,
    *,
    classes: Sequence[int] = (0, 1, 2, 3, 4),
    epochs: int | None = None,
    seed: int = 0,
    cache_dir: str | Path | None = None,
    progress: bool = False,
    **model_kwargs: Any,
) -> PretrainResult:
    """Like :func:`pretrain`, returning a :class:`PretrainResult` (model, accuracy, cache status)."""
    cls, epochs, full = _resolve(model, classes, epochs, model_kwargs)
    spec = _digits_spec(model, cls, epochs, seed, full)
    path = _cache_path(cache_dir, model, spec)
    recipe = EpochRecipe(
        epochs=epochs,
        lr=RECIPES.get(model, FALLBACK_RECIPE).lr,
        batch_size=_BATCH_SIZE,
        weight_decay=_WEIGHT_DECAY,
        label_smoothing=_LABEL_SMOOTHING,
        warmup=_WARMUP,
    )

    def train(net: ClassifierModel) -> dict[str, Any]:
        train_part, test_part = _source_split(_digits_for(net.input_shape), cls, seed)
        logger.info(
            "pretraining %s on digits %s (%d samples, %d epochs)", model, cls, len(train_part), epochs
        )
        start = time.perf_counter()
        _zero_init_residuals(net)
        with _progress(progress, epochs, f"pretraining {model}") as advance:
            train_epochs(
                net,
                train_part.x,
                train_part.y,
                recipe,
                generator=torch.Generator().manual_seed(seed),
                augment=_augment,
                after_epoch=advance,
            )
        seconds = time.perf_counter() - start
        accuracy = _accuracy(net, test_part)
        logger.info("pretrained %s: source accuracy %.4f in %.1f s", model, accuracy, seconds)
        return {"source_accuracy": accuracy, "train_time_s": round(seconds, 3)}

    out = _cached_training(
        path, lambda: create_model(model, num_classes=len(cls), **model_kwargs), train, spec=spec, seed=seed
    )
    return PretrainResult(
        out.model,
        float(out.metadata["source_accuracy"]),
        out.cached,
        path,
        epochs,
        float(out.metadata.get("train_time_s", "nan")),
    )


def pretrain_backbone(
    model: str,
    data: TensorData,
    *,
    epochs: int = 20,
    seed: int = 0,
    lr: float = 3e-3,
    batch_size: int = 32,
    cache_dir: str | os.PathLike[str] | None = None,
    **model_kwargs: Any,
) -> ClassifierModel:
    """A zoo model trained on ``data`` (its labels must be ``0..k-1``), cached by content.

    The same loop and cache as :func:`pretrain`, on the caller's data: AdamW (weight decay 1e-4), one-cycle
    schedule (30 % warm-up), label smoothing 0.05, no augmentation. The file lives in the same cache
    (``<cache>/pretrained/``), keyed by the model, its arguments, a digest of ``data``, the epochs, the
    seed, the learning rate, the batch size and the recipe version.
    """
    classes = data.classes
    if classes != tuple(range(len(classes))) or len(classes) < 2:
        raise ConfigError(f"pretraining labels must be 0..k-1 with k >= 2, got classes {classes}")
    recipe = EpochRecipe(epochs=epochs, lr=lr, batch_size=batch_size)
    spec = {
        "model": model,
        "model_kwargs": model_kwargs,
        "data": data_digest(data),
        "epochs": epochs,
        "seed": seed,
        "lr": lr,
        "batch_size": batch_size,
        "recipe_version": RECIPE_VERSION,
    }
    path = _cache_path(cache_dir, model, spec)

    def train(net: ClassifierModel) -> dict[str, Any]:
        start = time.perf_counter()
        train_epochs(net, data.x, data.y, recipe, generator=torch.Generator().manual_seed(seed))
        seconds = time.perf_counter() - start
        logger.info("pretrained backbone %s on %d samples in %.1f s -> %s", model, len(data), seconds, path)
        return {"train_time_s": round(seconds, 3)}

    build = lambda: create_model(model, num_classes=len(classes), **model_kwargs)  # noqa: E731
    return _cached_training(path, build, train, spec=spec, seed=seed).model


def pretrain(
    model: str,
    *,
    classes: Sequence[int] = (0, 1, 2, 3, 4),
    epochs: int | None = None,
    seed: int = 0,
    cache_dir: str | Path | None = None,
    progress: bool = False,
    **model_kwargs: Any,
) -> ClassifierModel:
    """A zoo model pretrained on the digits of ``classes`` (head: ``len(classes)`` outputs), cached.

    Args:
        model: registered model name (see :func:`ondevice.models.list_models`).
        classes: digit labels to train on; label ``classes[i]`` becomes output ``i``.
        epochs: training epochs; None uses the recipe's default for the model (:data:`DEFAULT_EPOCHS`).
        seed: seeds initialisation, shuffling, augmentation and the train/test split.
        cache_dir: cache root (default ``$ONDEVICE_CACHE_DIR`` or ``~/.cache/ondevice``).
        progress: show a rich progress bar while training.
        **model_kwargs: passed to :func:`~ondevice.models.create_model` (e.g. ``width_mult=0.35,
            resolution=32``); the digits are resized to the model's ``input_shape``.

    Returns:
        The trained model in eval mode. A second call with the same arguments loads the cached weights
        (bit-identical) without training; a corrupt cache file is logged and recomputed.
    """
    return pretrain_with_report(
        model,
        classes=classes,
        epochs=epochs,
        seed=seed,
        cache_dir=cache_dir,
        progress=progress,
        **model_kwargs,
    ).model
