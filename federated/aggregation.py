"""Aggregation of sparse (trainable-only) updates: FedAvg weighted by samples, FedProx's proximal term.

Devices send *updates* ``delta_k = w_k - w`` of the trainable tensors only. The server's new tensors are
``w + sum_k n_k delta_k / sum_k n_k``, which is FedAvg (McMahan et al., "Communication-Efficient
Learning of Deep Networks from Decentralized Data", AISTATS 2017, Alg. 1) restricted to what trains:
frozen tensors are identical on every device and never travel. FedProx (Li et al., "Federated
Optimization in Heterogeneous Networks", MLSys 2020, Eq. 2) aggregates the same way; its difference is
the proximal term each device adds to its local loss, :func:`proximal_term`.

The server may also take the averaged update as a pseudo-gradient and step with momentum,
:func:`server_step` (FedAvgM: Hsu et al., "Measuring the Effects of Non-Identical Data Distribution
for Federated Visual Classification", arXiv:1909.06335, 2019; Reddi et al., "Adaptive Federated Optimization",
ICLR 2021, Alg. 1 with a momentum server optimizer). Momentum 0 and server learning rate 1 is FedAvg.

The average does not depend on the order the replies arrive in: the updates are summed in an order
fixed by their weights and content, so a federation whose devices are deterministic gives the same
global model however the engine schedules them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ondevice.errors import ConfigError

__all__ = [
    "ServerStep",
    "apply_update",
    "proximal_term",
    "server_step",
    "update_norm",
    "weighted_average",
]


def weighted_average(
    updates: Sequence[Mapping[str, np.ndarray]], weights: Sequence[float]
) -> dict[str, np.ndarray]:
    """Per-key average of ``updates`` weighted by ``weights`` (sample counts), in float64, sorted keys.

    Float tensors keep their dtype; integer tensors (BatchNorm's ``num_batches_tracked``) are rounded
    back to their dtype. Equals ``numpy.average(stacked, axis=0, weights=weights)`` per key, and is
    bit-identical for any order of the (update, weight) pairs.

    Raises:
        ConfigError: no updates, mismatched keys or shapes, or weights that are not positive and finite.
    """
    if not updates:
        raise ConfigError("weighted_average needs at least one update")
    if len(weights) != len(updates):
        raise ConfigError(f"got {len(updates)} updates but {len(weights)} weights")
    w = np.asarray(weights, dtype=np.float64)
    if not np.all(np.isfinite(w)) or np.any(w <= 0):
        raise ConfigError(f"weights must be positive and finite, got {list(weights)}")
    keys = sorted(updates[0])
    for i, update in enumerate(updates[1:], start=1):
        if sorted(update) != keys:
            raise ConfigError(f"update {i} has keys {sorted(update)[:5]}..., expected {keys[:5]}...")
    w = w / w.sum()
    order = sorted(range(len(updates)), key=lambda i: (w[i], _digest(updates[i], keys)))
    w, updates = w[order], [updates[i] for i in order]
    out: dict[str, np.ndarray] = {}
    for key in keys:
        first = updates[0][key]
        total = np.zeros(first.shape, dtype=np.float64)
        for share, update in zip(w, updates, strict=True):
            if update[key].shape != first.shape:
                raise ConfigError(f"{key!r}: shape {update[key].shape} differs from {first.shape}")
            total += share * update[key].astype(np.float64)
        out[key] = (
            total.astype(first.dtype)
            if np.issubdtype(first.dtype, np.floating)
            else (np.rint(total).astype(first.dtype))
        )
    return out


def _digest(update: Mapping[str, np.ndarray], keys: Sequence[str]) -> bytes:
    """A content key that orders updates for summation (shapes are checked by the caller)."""
    digest = hashlib.blake2b(digest_size=16)
    for key in keys:
        value = np.ascontiguousarray(update[key])
        digest.update(f"{key}:{value.dtype.str}:{value.shape}".encode())
        digest.update(value.tobytes())
    return digest.digest()


def apply_update(base: Mapping[str, np.ndarray], update: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``base + update`` per key (same keys required), keeping each tensor's dtype."""
    if sorted(base) != sorted(update):
        raise ConfigError("apply_update needs the same keys in base and update")
    return {k: (base[k] + update[k]).astype(base[k].dtype) for k in sorted(base)}


@dataclass(frozen=True, eq=False)
class ServerStep:
    """What :func:`server_step` returns: the new global tensors and the server's momentum buffer."""

    arrays: dict[str, np.ndarray]
    velocity: dict[str, np.ndarray]


def server_step(
    base: Mapping[str, np.ndarray],
    update: Mapping[str, np.ndarray],
    velocity: Mapping[str, np.ndarray],
    *,
    lr: float = 1.0,
    momentum: float = 0.0,
    plain: Iterable[str] = (),
) -> ServerStep:
    """The server's step on this round's mean ``update`` (FedAvgM, see the module docstring).

    With ``delta`` the sample-weighted mean update (:func:`weighted_average`) and ``v`` the buffer
    ``velocity`` (empty at the start of a run)::

        v <- momentum * v + delta        (v starts at 0)
        w <- w + lr * v

    for the floating-point tensors, in float64. This is Flower's ``FedAvgM`` (PyTorch's SGD convention,
    pseudo-gradient ``w - mean_k w_k = -delta``), with two differences that are ours: the tensors named in
    ``plain`` (running statistics, which are estimates rather than descent directions) and integer tensors
    take the mean update as it is, and the arithmetic is float64 rather than the tensors' own dtype.
    ``lr=1, momentum=0`` is plain FedAvg (``base + update`` per key). ``velocity`` is not changed; the
    buffer to pass next round is in the result (unchanged when ``momentum`` is 0).

    Raises:
        ConfigError: ``lr`` not > 0, ``momentum`` outside [0, 1), or different keys in base and update.
    """
    if isinstance(lr, bool) or not isinstance(lr, int | float) or not 0 < lr < float("inf"):
        raise ConfigError(f"the server learning rate must be a number > 0, got {lr!r}")
    if isinstance(momentum, bool) or not isinstance(momentum, int | float) or not 0 <= momentum < 1:
        raise ConfigError(f"the server momentum must be a number in [0, 1), got {momentum!r}")
    if sorted(base) != sorted(update):
        raise ConfigError("server_step needs the same keys in base and update")
    buffer = dict(velocity)
    if lr == 1.0 and momentum == 0.0:
        return ServerStep(apply_update(base, update), buffer)
    plain = frozenset(plain)
    out: dict[str, np.ndarray] = {}
    for key in sorted(base):
        value = update[key]
        if key in plain or not np.issubdtype(value.dtype, np.floating):
            out[key] = (base[key] + value).astype(base[key].dtype)
            continue
        step = value.astype(np.float64)
        if momentum:
            if key in buffer:
                step += float(momentum) * buffer[key]
            buffer[key] = step
        out[key] = (base[key].astype(np.float64) + float(lr) * step).astype(base[key].dtype)
    return ServerStep(out, buffer)


def update_norm(update: Mapping[str, np.ndarray]) -> float:
    """L2 norm of the floating-point tensors of an update, taken together (integer counters ignored)."""
    total = 0.0
    for value in update.values():
        if np.issubdtype(value.dtype, np.floating):
            total += float(np.sum(np.square(value.astype(np.float64))))
    return float(np.sqrt(total))


def proximal_term(params: Mapping[str, Tensor], anchor: Mapping[str, Tensor], mu: float) -> Tensor:
    """FedProx's ``mu / 2 * ||w - w_t||^2`` over the trainable tensors (Li et al. 2020, Eq. 2).

    ``params`` are the live trainable parameters, ``anchor`` the global values received this round
    (detached). Differentiable in ``params``; zero when ``mu`` is 0.
    """
    if isinstance(mu, bool) or not isinstance(mu, int | float) or mu < 0:
        raise ConfigError(f"mu must be a number >= 0, got {mu!r}")
    terms = [
        torch.sum((p - anchor[name].to(p.dtype)) ** 2) for name, p in params.items() if p.is_floating_point()
    ]
    if not terms:
        return torch.zeros(())
    return 0.5 * float(mu) * torch.stack(terms).sum()
