"""How a learner uses its replay buffer: a draw per optimizer step, the losses, and storing new samples.

Experience replay (ER) trains the new batch together with a mini-batch drawn from the buffer, under one
cross-entropy (Chaudhry et al. 2019, "On Tiny Episodic Memories in Continual Learning"). A buffer that
keeps logits turns it into DER++ (Buzzega et al., NeurIPS 2020, "Dark Experience for General Continual
Learning"): ``CE(new) + beta * CE(replayed) + alpha * MSE(replayed logits, stored logits)``, the
MSE over the columns the head had when each sample was stored.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F

from ondevice.continual.buffer import ReplayBuffer, ReplayDraw

__all__ = ["draw_replay", "replay_loss", "store_samples", "task_loss"]


def draw_replay(buffer: ReplayBuffer | None, batch_size: int, dtype: torch.dtype) -> ReplayDraw | None:
    """A fresh draw of ``batch_size`` samples, inputs cast to ``dtype``; None without a (filled) buffer."""
    if buffer is None or len(buffer) == 0:
        return None
    draw = buffer.draw(batch_size)
    return ReplayDraw(draw.x.to(dtype), draw.y, draw.logits, draw.logit_mask)


def store_samples(buffer: ReplayBuffer, inputs: Tensor, y: Tensor, logits: Tensor | None) -> None:
    """Offer the new samples to ``buffer``, with their logits when it keeps them (DER++)."""
    buffer.add(inputs, y, logits if buffer.config.logits else None)


def replay_loss(logits: Tensor, replay: ReplayDraw, *, der_alpha: float, der_beta: float) -> Tensor:
    """Loss on replayed samples alone: CE for ER; ``beta * CE + alpha * masked MSE`` for DER++."""
    if replay.logits is None or replay.logit_mask is None:
        return F.cross_entropy(logits, replay.y)
    width = min(int(logits.shape[1]), int(replay.logits.shape[1]))
    mask = replay.logit_mask[:, :width].to(logits.dtype)
    squared = (logits[:, :width] - replay.logits[:, :width].to(logits.dtype)).pow(2) * mask
    mse = squared.sum() / mask.sum().clamp_min(1.0)
    return der_beta * F.cross_entropy(logits, replay.y) + der_alpha * mse


def task_loss(
    logits: Tensor, y: Tensor, replay: ReplayDraw | None, n: int, *, der_alpha: float, der_beta: float
) -> Tensor:
    """Loss on the first ``n`` rows (new, labels ``y``) and the rest (``replay``) of ``logits``.

    ER: cross-entropy over new and replayed samples together; DER++: new CE plus the replay terms.
    """
    if replay is None:
        return F.cross_entropy(logits[:n], y)
    if replay.logits is None:
        return F.cross_entropy(logits, torch.cat([y, replay.y]))
    return F.cross_entropy(logits[:n], y) + replay_loss(
        logits[n:], replay, der_alpha=der_alpha, der_beta=der_beta
    )
