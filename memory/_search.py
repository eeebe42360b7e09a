"""The search of :func:`memory.plan` over tiny-training's sparse schemes (Lin et al. 2022, Sec. 3.2).

A sparse scheme is a bias depth and a set of (layer, channel ratio) weight updates (:class:`_Sparse`); the
per-layer cost table prices one in arithmetic and the contribution analysis predicts its gain. The search
is greedy (best gain per byte that still fits) to seed an evolutionary one (mutation of the bias depth and
of single layers' ratios, crossover of two parents' layer choices), seeded so that it is deterministic.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

from memory._cost_table import _CostTable, _Sparse
from memory.contribution import Contributions
from ondevice.schemes import Sparse


def _options(table: _CostTable, ratios: Sequence[float]) -> dict[int, list[float]]:
    return {info.index: [float(r) for r in ratios if r >= 1.0 or info.groups == 1] for info in table.layers}


def _every_weight(c: _Sparse, n: int) -> bool:
    """Whether ``c`` trains every layer's weights at full width: full fine-tuning, not a sparse update."""
    return len(c.weights) == n and all(r >= 1.0 for _, r in c.weights)


def _fitness(c: _Sparse, table: _CostTable, gains: Contributions, limit: int, exclude_full: bool) -> float:
    if table.needed(c) > limit or (exclude_full and _every_weight(c, len(table.layers))):
        return float("-inf")
    return gains.gain(c.bias_k, c.weights)


def _greedy(
    table: _CostTable,
    gains: Contributions,
    options: dict[int, list[float]],
    limit: int,
    exclude_full: bool = False,
) -> _Sparse:
    n = len(table.layers)
    best = _Sparse(0, ())
    for k in range(n + 1):
        if table.needed(_Sparse(k, ())) <= limit and gains.bias_gain[k] >= gains.bias_gain[best.bias_k]:
            best = _Sparse(k, ())
    while True:
        current = dict(best.weights)
        base_gain, base_cost = gains.gain(best.bias_k, best.weights), table.needed(best)
        step, step_value = None, 0.0
        for i, rs in options.items():
            for r in rs:
                if current.get(i, 0.0) >= r:
                    continue
                trial = _Sparse(best.bias_k, tuple(sorted({**current, i: r}.items())))
                cost = table.needed(trial)
                if cost > limit or (exclude_full and _every_weight(trial, n)):
                    continue
                value = (gains.gain(trial.bias_k, trial.weights) - base_gain) / max(1, cost - base_cost)
                if value > step_value:
                    step, step_value = trial, value
        if step is None:
            return best
        best = step


def _evolve(
    table: _CostTable,
    gains: Contributions,
    options: dict[int, list[float]],
    limit: int,
    seed: int,
    *,
    exclude_full: bool = False,
    population: int = 48,
    generations: int = 40,
) -> _Sparse:
    rng = random.Random(seed)
    n = len(table.layers)
    layer_ids = list(options)

    def mutate(c: _Sparse) -> _Sparse:
        weights = dict(c.weights)
        k = c.bias_k
        if rng.random() < 0.4:
            k = min(n, max(0, k + rng.randint(-max(1, n // 8), max(1, n // 8))))
        if layer_ids and rng.random() < 0.8:
            i = rng.choice(layer_ids)
            choice = rng.choice([0.0, *options[i]])
            if choice == 0.0:
                weights.pop(i, None)
            else:
                weights[i] = choice
        return _Sparse(k, tuple(sorted(weights.items())))

    def crossover(a: _Sparse, b: _Sparse) -> _Sparse:
        ids = {i for i, _ in a.weights} | {i for i, _ in b.weights}
        da, db = dict(a.weights), dict(b.weights)
        weights = {}
        for i in ids:
            pick = da.get(i) if rng.random() < 0.5 else db.get(i)
            if pick:
                weights[i] = pick
        return _Sparse(rng.choice((a.bias_k, b.bias_k)), tuple(sorted(weights.items())))

    greedy = _greedy(table, gains, options, limit, exclude_full)

    def fitness(c: _Sparse) -> float:
        return _fitness(c, table, gains, limit, exclude_full)

    pool = [greedy, _Sparse(0, ())]
    while len(pool) < population:
        pool.append(mutate(rng.choice(pool)))
    for _ in range(generations):
        ranked = sorted(set(pool), key=fitness, reverse=True)
        parents = ranked[: max(2, population // 4)]
        pool = list(parents)
        while len(pool) < population:
            child = crossover(rng.choice(parents), rng.choice(parents)) if rng.random() < 0.5 else None
            pool.append(mutate(child or rng.choice(parents)))
    return max(set(pool), key=lambda c: (fitness(c), -table.needed(c)))


def _to_scheme(c: _Sparse) -> Any:
    return Sparse(
        bias_last_k=c.bias_k,
        weight_layers=tuple(i for i, _ in c.weights),
        channel_ratios=tuple(r for _, r in c.weights),
    )
