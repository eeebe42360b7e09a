"""The named continual-learning strategies of :func:`~ondevice.continual.create_learner`, declared once.

A strategy is data: whether it replays (raw inputs or latents at the frozen front's boundary), whether
its buffer keeps logits (DER++), and which regulariser it adds. :data:`STRATEGY_RECIPES` is the one place
they are declared; :data:`STRATEGIES` and :func:`strategy_recipe` read it.

"Strategy" is meant in the continual-learning sense (Avalanche's): how a learner trains on a stream. The
server algorithms Flower calls strategies (FedAvgM, FedProx) are :mod:`federated.strategy`'s, chosen by
``FederatedConfig.aggregation``; a federation's ``FederatedConfig.strategy`` is the devices' continual one.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Literal

from ondevice.continual.regularizers import LwF, OnlineEWC, Regularizer
from ondevice.errors import UnknownNameError

__all__ = [
    "STRATEGIES",
    "STRATEGY_RECIPES",
    "RegularizerOptions",
    "Strategy",
    "StrategyRecipe",
    "strategy_recipe",
]

Strategy = Literal["naive", "replay", "latent-replay", "der", "latent-der", "lwf", "ewc"]
"""The declared names for type checkers (the same names as :data:`STRATEGY_RECIPES`)."""


@dataclass(frozen=True)
class RegularizerOptions:
    """The regulariser settings :func:`~ondevice.continual.create_learner` takes."""

    temperature: float = 2.0
    lwf_weight: float = 1.0
    ewc_lambda: float = 100.0


@dataclass(frozen=True)
class StrategyRecipe:
    """What a named strategy is made of.

    Attributes:
        replay: what its buffer stores and replays: ``"input"`` (raw inputs), ``"latent"`` (activations
            at the frozen front's boundary) or None (no buffer).
        logits: the buffer also keeps each sample's logits (DER++).
        regularizer: builds its regulariser from the options (None: none).
        description: one line for listings.
    """

    replay: Literal["input", "latent"] | None = None
    logits: bool = False
    regularizer: Callable[[RegularizerOptions], Regularizer] | None = None
    description: str = ""

    @property
    def default_bits(self) -> Literal[8, 32]:
        """Bits per stored value unless the caller chooses: latents are kept in 8 bits, inputs in 32."""
        return 8 if self.replay == "latent" else 32


def _lwf(options: RegularizerOptions) -> Regularizer:
    return LwF(options.temperature, options.lwf_weight)


def _ewc(options: RegularizerOptions) -> Regularizer:
    return OnlineEWC(options.ewc_lambda)


STRATEGY_RECIPES: Mapping[str, StrategyRecipe] = MappingProxyType(
    {
        "naive": StrategyRecipe(description="plain fine-tuning on the stream (forgets catastrophically)"),
        "replay": StrategyRecipe(replay="input", description="experience replay of raw inputs"),
        "der": StrategyRecipe(replay="input", logits=True, description="DER++: replay with stored logits"),
        "latent-replay": StrategyRecipe(replay="latent", description="replay of frozen-front activations"),
        "latent-der": StrategyRecipe(replay="latent", logits=True, description="DER++ on latents"),
        "lwf": StrategyRecipe(regularizer=_lwf, description="Learning without Forgetting, no buffer"),
        "ewc": StrategyRecipe(regularizer=_ewc, description="online EWC, no buffer"),
    }
)
"""Every named strategy and what it is made of: the one place strategies are declared."""

STRATEGIES: tuple[str, ...] = tuple(sorted(STRATEGY_RECIPES))


def strategy_recipe(name: str) -> StrategyRecipe:
    """The recipe of the strategy ``name``.

    Raises:
        UnknownNameError: ``name`` is not a declared strategy (the message lists them).
    """
    if name not in STRATEGIES:
        raise UnknownNameError("strategy", name, STRATEGIES)
    return STRATEGY_RECIPES[name]
