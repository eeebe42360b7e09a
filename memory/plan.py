"""``memory.plan``: choose the update scheme that fits a memory budget and promises the most accuracy.

tiny-training's recipe (Lin et al., NeurIPS 2022, Sec. 3.2), whose search code was never released:

1. **Contribution analysis** (:mod:`memory.contribution`): the accuracy gain of each bias depth and of each
   layer's weights at each channel ratio, measured by brief fine-tuning when ``data`` is given, else a
   documented prior; gains are assumed additive.
2. **Memory of a sparse scheme** from a per-layer cost table built with :func:`memory.estimate` (one
   fake-tensor step of the all-biases scheme gives what each depth keeps; one fake forward gives each
   layer's input size), so a candidate costs arithmetic, not a step.
3. **Evolutionary search** under the budget (population 48, 40 generations, mutation of the bias depth and
   of single layers' ratios, crossover of two parents' layer choices; seeded, so deterministic), seeded
   with a greedy solution (add the best gain-per-byte part that still fits).
4. **Verification**: the winner is estimated for real (``memory.estimate`` of the prepared model); if the
   cost table was optimistic it is searched again under the budget less the overshoot.

The named schemes (``last_layer``, ``bias``, ``lite_residual``, ``full``) compete too, each estimated (or
skipped when its trainable state alone exceeds the budget), and, on a model with blocks, each named scheme
once more with exact recomputation (``prepare(..., recompute=True)``: the same gradients, so the same
predicted gain, for less memory on transformers and one more forward of each block). Every estimate counts
the step's compute too (``MemoryReport.step_flops``), so among candidates that fit with the same gain the
one that computes least wins, then the one that needs least: recomputation is chosen where it is what makes
a scheme fit, never for free. What counts against the budget is
:func:`memory.budget_bytes_needed`: activations + trainable parameters + gradients + optimizer state
(+ frozen parameters at the budget's width when it counts them); for a process budget (a Linux board's,
or ``Budget.for_process``) the resident memory the eager step adds instead (``memory.process``).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from torch import Tensor, nn

from memory._cost_table import _CostTable, _layer_infos, _Sparse
from memory._search import _every_weight, _evolve, _options, _to_scheme
from memory.budget import Budget, HasTrainingBudget, format_bytes
from memory.contribution import measure_contributions, prior_contributions
from memory.estimate import OptimizerSpec, _batch_shape, estimate
from memory.measure import LossFn, distinct_storage_bytes
from memory.report import MemoryReport, budget_bytes_needed, device_limits, explain_needed, needed_terms
from ondevice import prepare
from ondevice.errors import BudgetExceededError, ConfigError, OnDeviceError
from ondevice.ops.convert import compressible_layers
from ondevice.ops.registry import COMPRESS_MODES, CompressMode
from ondevice.prepared import find_head
from ondevice.quantize import quantizable_frozen
from ondevice.recompute import find_blocks
from ondevice.schemes import Scheme, Sparse, resolve_scheme
from ondevice.schemes._tree import compute_layers

__all__ = ["Candidate", "Plan", "plan"]

logger = logging.getLogger(__name__)

NAMED_SCHEMES: tuple[str, ...] = ("last_layer", "bias", "lite_residual", "full")
DEFAULT_RATIOS: tuple[float, ...] = (0.125, 0.25, 0.5, 1.0)


@dataclass(frozen=True)
class Candidate:
    """One scheme the planner weighed: its bytes against the budget and its predicted gain.

    Attributes:
        scheme: the scheme's ``to_dict()``.
        needed_bytes: bytes counting against the budget (a lower bound when ``how == "bound"``).
        score: predicted accuracy gain (see ``Plan.score_source`` for the unit).
        fits: whether ``needed_bytes`` fits the budget.
        how: ``"estimated"`` (a fake-tensor step), ``"cost-table"`` (the per-layer table) or ``"bound"``
            (trainable state alone already exceeds the budget, so no step was run).
        recompute: whether the scheme runs with its blocks recomputed (``prepare(..., recompute=True)``).
        step_flops: the FLOPs of one training step (``MemoryReport.step_flops``; ``None`` for a bound).
    """

    scheme: dict[str, Any]
    needed_bytes: int
    score: float
    fits: bool
    how: Literal["estimated", "cost-table", "bound"] = "estimated"
    recompute: bool = False
    step_flops: int | None = None

    def __post_init__(self) -> None:
        if (
            isinstance(self.needed_bytes, bool)
            or not isinstance(self.needed_bytes, int)
            or self.needed_bytes < 0
        ):
            raise ConfigError(f"Candidate.needed_bytes must be an int >= 0, got {self.needed_bytes!r}")
        if self.how not in ("estimated", "cost-table", "bound"):
            raise ConfigError(f"Candidate.how must be estimated, cost-table or bound, got {self.how!r}")

    def to_dict(self) -> dict[str, Any]:
        return {"scheme": self.scheme, "needed_bytes": self.needed_bytes, "score": self.score,
                "fits": self.fits, "how": self.how, "recompute": self.recompute,
                "step_flops": self.step_flops}  # fmt: skip


@dataclass(frozen=True)
class Plan:
    """The update scheme chosen for a budget, with its memory report and what else was considered.

    Attributes:
        scheme: the chosen scheme (pass it to ``ondevice.prepare``).
        report: ``memory.estimate``'s report of the chosen scheme.
        budget: the budget planned for.
        needed_bytes: ``budget_bytes_needed(report, budget)``.
        score: predicted accuracy gain of the scheme.
        considered: every named scheme and the best searched sparse schemes, best score first.
        score_source: ``"measured"`` (accuracy gain over training the classifier alone, from the
            contribution analysis on ``data``) or ``"prior"`` (relative, full fine-tuning = 1).
        frozen_weights: how the frozen weights must be held for the figures to hold: ``"int8"`` when
            the budget counts them in memory at 8 bits (the report is the step of the model prepared with
            ``frozen_weights="int8"``), else ``"float"``.
        float_needed_bytes: with ``frozen_weights="int8"``, what the same scheme needs with float32
            frozen weights (so whether int8 is what makes it fit); else ``None``.
        recompute: the blocks the plan recomputes (``prepare(..., recompute=True)``); empty when it runs
            with exact memory-saving ops alone.
        exact_flops: with ``recompute``, the step's FLOPs of the same scheme without it (what the
            recomputation costs: ``report.step_flops / exact_flops``); else ``None``.
        exact_needed_bytes: with ``recompute``, what the same scheme needs without it; else ``None``.
        compress: the lossy compression of what smooth activations keep that every candidate was costed
            with (``plan(..., compress=...)``, passed on to ``prepare``), or ``None``.
    """

    scheme: Any
    report: MemoryReport
    budget: Budget
    needed_bytes: int
    score: float
    considered: tuple[Candidate, ...] = field(default_factory=tuple)
    score_source: Literal["prior", "measured"] = "prior"
    frozen_weights: Literal["float", "int8"] = "float"
    float_needed_bytes: int | None = None
    recompute: tuple[str, ...] = ()
    exact_flops: int | None = None
    exact_needed_bytes: int | None = None
    compress: CompressMode | None = None

    @property
    def needs_int8(self) -> bool:
        """Whether the plan fits only with frozen weights held in int8 (``prepare(..., frozen_weights=
        "int8")``): with float32 ones the same scheme would exceed the budget."""
        return self.float_needed_bytes is not None and not self.budget.fits(self.float_needed_bytes)

    def prepare_call(self) -> str:
        """The ``ondevice.prepare`` call that trains this plan as it was costed."""
        extra = ', frozen_weights="int8"' if self.frozen_weights == "int8" else ""
        extra += ", recompute=True" if self.recompute else ""
        extra += f", compress={self.compress!r}" if self.compress else ""
        return f"ondevice.prepare(model, {self.scheme.to_json()}{extra})"

    def __post_init__(self) -> None:
        if not isinstance(self.scheme, Scheme):
            raise ConfigError(f"Plan.scheme must be a Scheme, got {type(self.scheme).__name__}")
        if not isinstance(self.report, MemoryReport) or not isinstance(self.budget, Budget):
            raise ConfigError("Plan.report must be a MemoryReport and Plan.budget a Budget")
        if self.needed_bytes > self.budget.total_bytes:
            raise ConfigError(f"Plan.needed_bytes {self.needed_bytes} exceeds the budget {self.budget}")
        object.__setattr__(self, "considered", tuple(self.considered))
        object.__setattr__(self, "recompute", tuple(self.recompute))

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict.

        ``needed_bytes`` is the figure compared with ``budget.total_bytes``; ``requirement`` names its
        terms, and ``exceeds_device`` lists figures the device behind the budget cannot hold.
        """
        return {
            "scheme": self.scheme.to_dict(),
            "report": self.report.to_dict(),
            "budget": {
                "total_bytes": self.budget.total_bytes,
                "name": self.budget.name,
                "count_frozen_params": self.budget.count_frozen_params,
                "frozen_param_bits": self.budget.frozen_param_bits,
                "memory_bytes": self.budget.memory_bytes,
                "flash_bytes": self.budget.flash_bytes,
                "process_overhead_bytes": self.budget.process_overhead_bytes,
                "rss_per_tensor_byte": self.budget.rss_per_tensor_byte,
            },
            "needed_bytes": self.needed_bytes,
            "requirement": {
                "compared_with": "budget.total_bytes",
                "terms": needed_terms(self.report, self.budget),
                "counts_process": self.budget.counts_process,
                "not_compared": {} if self.budget.counts_process else {"peak_bytes": self.report.peak_bytes},
            },
            "exceeds_device": device_limits(self.report, self.budget),
            "score": self.score,
            "score_source": self.score_source,
            "frozen_weights": self.frozen_weights,
            "float_needed_bytes": self.float_needed_bytes,
            "needs_int8": self.needs_int8,
            "recompute": list(self.recompute),
            "exact_flops": self.exact_flops,
            "exact_needed_bytes": self.exact_needed_bytes,
            "compress": self.compress,
            "prepare_call": self.prepare_call(),
            "considered": [c.to_dict() for c in self.considered],
        }

    def to_markdown(self, *, top: int | None = 10) -> str:
        """The chosen scheme, which figure is the requirement, the candidates and the memory report."""
        chosen = _describe(self.scheme.to_dict(), bool(self.recompute))
        lines = [
            f"Plan for a budget of {self.budget}: **{chosen}**, "
            f"predicted gain {self.score:.3f} "
            f"({self.score_source})",
            "",
            f"`{self.scheme.to_json()}`",
            "",
            *self._frozen_weights_lines(),
            *self._recompute_lines(),
            *self._compress_lines(),
            explain_needed(self.report, self.budget),
            "Candidates (needed: the figure compared with the budget; compute: FLOPs of one step):",
            "",
            "| candidate | needed | fits | gain | compute | how |",
            "|---|---:|:---:|---:|---:|---|",
        ]
        shown = self.considered if top is None else self.considered[:top]
        for c in shown:
            lines.append(
                f"| {_describe(c.scheme, c.recompute)} | {format_bytes(c.needed_bytes)} | "
                f"{'yes' if c.fits else 'no'} | {c.score:.3f} | {_gflops(c.step_flops)} | {c.how} |"
            )
        return "\n".join(lines) + "\n\n" + self.report.to_markdown()

    def _compress_lines(self) -> list[str]:
        if not self.compress:
            return []
        return [
            f"Costed with `compress={self.compress!r}`: smooth activations keep {self.compress} codes for "
            f"backward (lossy: the gradients are approximate; `bench/modes.py` measures the accuracy cost).",
            "",
        ]

    def _recompute_lines(self) -> list[str]:
        if not self.recompute:
            return []
        cost = ""
        if self.exact_flops and self.report.step_flops is not None:
            cost = f" for {self.report.step_flops / self.exact_flops:.2f}x the compute of a step without it"
        without = ""
        if self.exact_needed_bytes is not None:
            over = "" if self.budget.fits(self.exact_needed_bytes) else ", over the budget"
            without = f" (without it this scheme needs {format_bytes(self.exact_needed_bytes)}{over})"
        n = len(self.recompute)
        return [
            f"**Recomputes {n} block{'s' if n != 1 else ''}** in backward "
            f"(exact gradients){cost}{without}. Train it with `{self.prepare_call()}`.",
            "",
        ]

    def _frozen_weights_lines(self) -> list[str]:
        if self.frozen_weights != "int8" or self.float_needed_bytes is None:
            return []
        float_needed = format_bytes(self.float_needed_bytes)
        if self.needs_int8:
            why = (
                f"**Needs frozen weights held in int8** to fit: with float32 frozen weights this scheme "
                f"needs {float_needed}, over the budget."
            )
        else:
            why = f"Costed with frozen weights in int8; it also fits with float32 ones ({float_needed})."
        return [f"{why} Train it with `{self.prepare_call()}`.", ""]


def _tensor_limit(budget: Budget) -> int:
    """The tensor bytes the cost table may spend: the whole budget, or for a process budget what is left
    after the fixed overhead, divided by the allocator factor (see :func:`memory.report.needed_terms`)."""
    if budget.process_overhead_bytes is None:
        return budget.total_bytes
    return max(0, int((budget.total_bytes - budget.process_overhead_bytes) / budget.rss_per_tensor_byte))


def _gflops(flops: int | None) -> str:
    return "-" if flops is None else f"{flops / 1e9:.3g} GFLOP"


def _describe(scheme: dict[str, Any], recompute: bool = False) -> str:
    if recompute:
        return _describe(scheme) + " + recompute"
    if scheme.get("name") != "sparse":
        return str(scheme.get("name"))
    weights = ", ".join(
        f"{w}@{r:g}"
        for w, r in zip(
            scheme.get("weight_layers", []),
            scheme.get("channel_ratios") or [1.0] * len(scheme.get("weight_layers", [])),
            strict=True,
        )
    )
    return f"sparse (bias last {scheme.get('bias_last_k')}, weights [{weights}])"


# -- plan -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Choice:
    """A candidate that fits, ranked by gain, then less compute, then less memory."""

    score: float
    needed: int
    flops: int
    scheme: Any
    report: MemoryReport
    recompute: tuple[str, ...]  # the blocks recomputed (empty: exact ops alone)

    @property
    def key(self) -> tuple[float, int, int]:
        return (self.score, -self.flops, -self.needed)


def _int8_hint(budget: Budget, replan: Callable[[Budget], Plan]) -> str:
    """The end of a "does not fit" message: whether frozen weights held in int8 would make it fit."""
    try:
        alternative = replan(dataclasses.replace(budget, frozen_param_bits=8))
    except BudgetExceededError:
        return (
            f", or hold frozen weights in int8 (they count at {budget.frozen_param_bits} bit; in int8 "
            f"nothing fits either)"
        )
    return (
        f", or hold frozen weights in int8: then {_describe(alternative.scheme.to_dict())} fits, needing "
        f"{format_bytes(alternative.needed_bytes)} ({alternative.prepare_call()}; `ondevice plan "
        f"--int8-frozen`)"
    )


def _compress_hint(budget: Budget, replan: Callable[[Budget], Plan]) -> str:
    """The end of a "does not fit" message: whether 2-bit compression of smooth activations would fit."""
    try:
        alternative = replan(budget)
    except BudgetExceededError:
        return (
            ", or compress what smooth activations keep (compress='2bit' does not make anything fit either)"
        )
    return (
        f", or compress what smooth activations keep (lossy): with compress='2bit' "
        f"{_describe(alternative.scheme.to_dict(), bool(alternative.recompute))} fits, needing "
        f"{format_bytes(alternative.needed_bytes)} ({alternative.prepare_call()}; "
        f"`ondevice plan --compress 2bit`)"
    )


def plan(
    model: nn.Module,
    budget: Budget | str | int | HasTrainingBudget,
    input_shape: Sequence[int] | None = None,
    data: tuple[Tensor, Tensor] | None = None,
    *,
    batch_size: int = 1,
    candidates: Sequence[Any] | None = None,
    search_sparse: bool = True,
    ratios: Sequence[float] = DEFAULT_RATIOS,
    optimizer: OptimizerSpec | None = None,
    loss_fn: LossFn | None = None,
    head: str | None = None,
    steps: int = 30,
    lr: float = 0.05,
    weight_layers: Sequence[int] | None = None,
    seed: int = 0,
    recompute: bool = True,
    compress: CompressMode | None = None,
) -> Plan:
    """Choose the update scheme for ``model`` that fits ``budget`` and promises the most accuracy.

    tiny-training's contribution analysis and search (Lin et al. 2022, Sec. 3.2); see the module
    docstring for the steps and :func:`memory.budget_bytes_needed` for what counts.

    Args:
        model: the pretrained model (not prepared).
        budget: a :class:`Budget`, bytes, a string such as ``"256KB"`` or a device profile. Frozen weights
            are counted (at the budget's ``frozen_param_bits``) only when the budget says so.
        input_shape: per-sample input shape (default: the model's ``input_shape``).
        data: a little held-out ``(x, y)`` for the contribution analysis; without it, the prior of
            :func:`memory.contribution.prior_contributions`.
        batch_size: samples per training step.
        candidates: fixed schemes (objects, names or dicts) to weigh instead of the named ones
            (``last_layer``, ``bias``, ``lite_residual``, ``full``).
        search_sparse: also search tiny-training's sparse schemes.
        ratios: channel ratios a weight layer may train on (dense layers; grouped ones only 1).
        optimizer, loss_fn: as for :func:`memory.estimate` (default: momentum SGD, cross-entropy).
        head: the classifier head's qualified name (found automatically when omitted).
        steps, lr: length and learning rate of each fine-tuning run of the contribution analysis.
        weight_layers: layer indices whose weights the analysis measures (default all; others get no
            gain); use it to bound the analysis on deep models.
        seed: seeds the fine-tuning runs and the evolutionary search.
        recompute: also weigh each named (or given) scheme with its blocks recomputed
            (``prepare(..., recompute=True)``; exact gradients, one more forward of each block), where the
            model has blocks. It wins only where it fits and the same scheme without it does not (or a
            better scheme fits only with it): at equal gain, less compute wins, then less memory.
        compress: cost every candidate with this lossy compression of what smooth activations keep
            (``prepare(..., compress=...)``: ``"int8"`` or ``"2bit"``); ``None`` (default) plans exact
            training, and when nothing fits, the error says whether ``compress="2bit"`` would make
            something fit. A model with nothing to compress (a ReLU network) plans without it.

    Raises:
        BudgetExceededError: no candidate fits; the message gives the smallest achievable figure and
            the scheme that reaches it.
    """
    budget = Budget.parse(budget)
    shape = _batch_shape(model, input_shape, batch_size)
    head = find_head(model, head)
    if compress is not None and compress not in COMPRESS_MODES:
        raise ConfigError(f"plan compress must be None, 'int8' or '2bit', got {compress!r}")
    if compress is not None and not compressible_layers(model):
        logger.info(
            "plan: %s has no smooth activation to compress; planning without compress", type(model).__name__
        )
        compress = None
    for r in ratios:
        if isinstance(r, bool) or not isinstance(r, int | float) or not 0 < r <= 1:
            raise ConfigError(f"plan ratios must be in (0, 1], got {r!r}")
    bits = budget.frozen_param_bits

    def measure_scheme(scheme: Any) -> MemoryReport:
        prepared = prepare(model, scheme, head=head, compress=compress)
        return estimate(prepared.model, shape, optimizer=optimizer, loss_fn=loss_fn,
                        frozen_param_bits=bits, copy_model=False)  # fmt: skip

    layers = _layer_infos(compute_layers(model, head))
    if data is not None:
        gains = measure_contributions(
            model, layers, data, ratios=ratios, weight_layers=weight_layers, steps=steps, lr=lr, seed=seed,
            named=[n for n in NAMED_SCHEMES if n != "last_layer"] if candidates is None else (),
        )  # fmt: skip
    else:
        gains = prior_contributions(layers, ratios)

    considered: list[Candidate] = []
    best: _Choice | None = None
    smallest: tuple[int, Any, bool] | None = None
    exact: dict[str, tuple[int, int | None]] = {}  # scheme JSON -> (needed, FLOPs) without recompute

    def weigh(
        scheme: Any,
        score: float,
        report: MemoryReport | None,
        bound: int | None,
        recomputed: tuple[str, ...] = (),
    ) -> None:
        nonlocal best, smallest
        rc = bool(recomputed)
        needed = budget_bytes_needed(report, budget) if report is not None else int(bound or 0)
        fits = report is not None and budget.fits(needed)
        how: Literal["estimated", "bound"] = "estimated" if report is not None else "bound"
        flops = report.step_flops if report is not None else None
        considered.append(Candidate(scheme.to_dict(), needed, score, fits, how, rc, flops))
        if report is None:
            return
        if not rc:
            exact[scheme.to_json()] = (needed, flops)
        if smallest is None or needed < smallest[0]:
            smallest = (needed, scheme, rc)
        choice = _Choice(score, needed, flops or 0, scheme, report, recomputed)
        if fits and (best is None or choice.key > best.key):
            best = choice

    blocks = find_blocks(model, head) if recompute else []
    fixed = [resolve_scheme(c) for c in (candidates if candidates is not None else NAMED_SCHEMES)]
    for scheme in fixed:
        for rc in (False, True) if blocks else (False,):
            try:
                prepared = prepare(model, scheme, head=head, recompute=rc, compress=compress)
            except OnDeviceError as exc:
                logger.info("plan skips %s%s: %s", scheme.name, " + recompute" if rc else "", exc)
                continue
            trainable = [p for p in prepared.model.parameters() if p.requires_grad]
            if not trainable:
                break
            bound = 2 * distinct_storage_bytes(trainable)
            score = gains.named_gain.get(scheme.name, 0.0) if scheme.name in NAMED_SCHEMES else 0.0
            if bound > budget.total_bytes:
                weigh(scheme, score, None, bound)
                break  # recomputation does not shrink the trainable state
            report = estimate(prepared.model, shape, optimizer=optimizer, loss_fn=loss_fn,
                              frozen_param_bits=bits, copy_model=False)  # fmt: skip
            if rc and exact.get(scheme.to_json(), (0, None))[1] == report.step_flops:
                continue  # backward never reaches a block (e.g. last_layer): nothing is recomputed
            weigh(scheme, score, report, None, prepared.recompute)

    if search_sparse and layers:
        table = _CostTable(
            model, head, shape, budget, optimizer=optimizer, loss_fn=loss_fn, compress=compress
        )
        options = _options(table, ratios)
        limit = _tensor_limit(budget)
        # Every layer's weights at full width is full fine-tuning: when `full` itself fits, the search
        # looks for a genuinely sparse update and `full` competes under its own name.
        exclude_full = any(c.fits and c.scheme.get("name") == "full" for c in considered)
        for _attempt in range(4):
            found = _evolve(table, gains, options, limit, seed, exclude_full=exclude_full)
            if table.needed(found) > limit or (exclude_full and _every_weight(found, len(table.layers))):
                break
            scheme = _to_scheme(found)
            report = measure_scheme(scheme)
            needed = budget_bytes_needed(report, budget)
            logger.info("plan: cost table %d bytes, estimate %d bytes for %s", table.needed(found), needed,
                        _describe(scheme.to_dict()))  # fmt: skip
            weigh(scheme, gains.gain(found.bias_k, found.weights), report, None)
            if needed <= budget.total_bytes:
                break
            limit -= needed - budget.total_bytes
        minimal = _Sparse(0, ())
        if smallest is None or table.needed(minimal) < smallest[0]:
            scheme = Sparse(bias_last_k=0, weight_layers=())
            weigh(scheme, 0.0, measure_scheme(scheme), None)

    if best is None:
        if smallest is None:
            raise BudgetExceededError(
                f"no update scheme could be estimated for {type(model).__name__} under {budget}",
                budget_bytes=budget.total_bytes,
                smallest_bytes=0,
            )
        needed, scheme, rc = smallest
        if not budget.count_frozen_params and not budget.counts_process:
            frozen = ""
        elif budget.frozen_param_bits > 8:
            frozen = _int8_hint(budget, lambda b: plan(
                model, b, input_shape, data, batch_size=batch_size, candidates=candidates,
                search_sparse=search_sparse, ratios=ratios, optimizer=optimizer, loss_fn=loss_fn, head=head,
                steps=steps, lr=lr, weight_layers=weight_layers, seed=seed, recompute=recompute,
                compress=compress))  # fmt: skip
        else:
            frozen = ", or keep frozen weights out of the budget (e.g. in flash)"
        if compress is None and compressible_layers(model):
            frozen += _compress_hint(budget, lambda b: plan(
                model, b, input_shape, data, batch_size=batch_size, candidates=candidates,
                search_sparse=search_sparse, ratios=ratios, optimizer=optimizer, loss_fn=loss_fn, head=head,
                steps=steps, lr=lr, weight_layers=weight_layers, seed=seed, recompute=recompute,
                compress="2bit"))  # fmt: skip
        raise BudgetExceededError(
            f"no update scheme of {type(model).__name__} fits the budget of {budget} "
            f"({budget.total_bytes} bytes) at input {shape}: the smallest achievable is {needed} bytes "
            f"({format_bytes(needed)}) with {_describe(scheme.to_dict(), rc)}. Raise the budget, lower the "
            f"batch size or resolution{frozen}",
            budget_bytes=budget.total_bytes,
            smallest_bytes=needed,
        )
    score, needed, scheme, report = best.score, best.needed, best.scheme, best.report
    rc = bool(best.recompute)
    float_needed = None
    if bits == 8 and (budget.count_frozen_params or budget.counts_process):
        floats = prepare(model, scheme, head=head, recompute=rc, compress=compress).model
        if quantizable_frozen(floats):  # the report is the int8-held model's: what would float32 need?
            float_report = estimate(floats, shape, optimizer=optimizer, loss_fn=loss_fn, copy_model=False)
            float32 = dataclasses.replace(budget, frozen_param_bits=32)
            float_needed = budget_bytes_needed(float_report, float32)
    considered.sort(key=lambda c: (not c.fits, -c.score, c.step_flops or 0, c.needed_bytes))
    exact_needed, exact_flops = exact.get(scheme.to_json(), (None, None)) if rc else (None, None)
    result = Plan(
        scheme=scheme,
        report=report,
        budget=budget,
        needed_bytes=needed,
        score=score,
        considered=tuple(considered),
        score_source=gains.source,
        frozen_weights="float" if float_needed is None else "int8",
        float_needed_bytes=float_needed,
        recompute=best.recompute,
        compress=compress,
        exact_flops=exact_flops,
        exact_needed_bytes=exact_needed,
    )
    logger.info(
        "plan under %s: %s, %d bytes, gain %.3f", budget, _describe(scheme.to_dict(), rc), needed, score
    )
    return result
