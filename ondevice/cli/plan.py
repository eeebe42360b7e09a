"""``ondevice plan``: the memory of a training step under a scheme, or the scheme that fits a budget."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Annotated, Any

import typer

import memory
import ondevice
from devices import get_profile
from ondevice.cli._app import app, configure_logging, console, fail, print_json
from ondevice.errors import BudgetExceededError, OnDeviceError, UnknownNameError
from ondevice.models import create_model, model_defaults
from ondevice.ops.registry import COMPRESS_MODES

_HELP = """Estimate the memory of one training step (no compute: fake tensors), or plan the update scheme.

With --scheme NAME, print that scheme's memory report. With --budget SIZE (e.g. 256KB) or --device NAME
(a device profile's training budget), choose the scheme that fits and promises the most accuracy
(tiny-training's contribution analysis + search, with a prior). What counts against a budget (the
requirement the output names): activations + trainable parameters + gradients + optimizer state, plus
frozen weights when they are counted. --device follows the device's convention (a Linux board counts
float32 frozen weights, a microcontroller keeps int8 ones in flash and the output checks them against its
flash); --int8-frozen counts frozen weights at 8 bits, --count-frozen/--no-count-frozen override.
A Linux board's --device, and --budget with --process-rss, budget the process instead: the peak resident
memory the eager step adds above `import torch, ondevice` (tensor peak x allocator factor + the step's
fixed overhead of kernel code and allocator, measured under memory.process.lean_process()); the output
says which figure it compares. On a model with blocks (the zoo ViT, transformers' layers) the planner also
weighs each scheme with its blocks recomputed in backward (exact gradients, one more forward of each
block; the candidates table gives every step's FLOPs) and picks it only where it is what makes a scheme
fit; --no-recompute leaves it out. With --scheme, --recompute reports that scheme recomputed.
--compress 2bit (or int8) costs every candidate with what smooth activations keep compressed (lossy:
approximate gradients; bench/modes.py measures the accuracy cost); without it, a budget nothing fits in
says whether 2-bit would make something fit.
"""


@app.command("plan", help=_HELP)
def plan_command(
    model: Annotated[
        str, typer.Option(help="Zoo model: cnn, cnn1d, mcunet, mobilenetv2, vit.")
    ] = "mobilenetv2",
    width_mult: Annotated[float | None, typer.Option(help="Width multiplier (mobilenetv2, mcunet).")] = None,
    resolution: Annotated[int | None, typer.Option(min=1, help="Input resolution in pixels.")] = None,
    num_classes: Annotated[int, typer.Option(min=1, help="Classes of the head.")] = 10,
    batch_size: Annotated[int, typer.Option(min=1, help="Samples per training step.")] = 1,
    scheme: Annotated[str | None, typer.Option(help="Report this scheme (full, bias, sparse, ...).")] = None,
    budget: Annotated[str | None, typer.Option(help="Plan under this budget, e.g. 256KB or 64MiB.")] = None,
    device: Annotated[str | None, typer.Option(help="Plan under this device profile's budget.")] = None,
    int8_frozen: Annotated[
        bool,
        typer.Option("--int8-frozen", help="Count frozen weights against the budget, at 8 bits (int8)."),
    ] = False,
    count_frozen: Annotated[
        bool | None,
        typer.Option(
            "--count-frozen/--no-count-frozen",
            help="Whether frozen weights count against the budget (default: the device's convention; "
            "not counted for --budget unless --int8-frozen).",
            show_default=False,
        ),
    ] = None,
    process_rss: Annotated[
        bool,
        typer.Option(
            "--process-rss",
            help="--budget is for the process: the peak RSS the step adds above the import, not tensors.",
        ),
    ] = False,
    optimizer: Annotated[str | None, typer.Option(help="sgd | adam (default: SGD with momentum).")] = None,
    recompute: Annotated[
        bool | None,
        typer.Option(
            "--recompute/--no-recompute",
            help="With --scheme: recompute the model's blocks in backward. With --budget/--device: whether "
            "the plan may (default) weigh recomputation.",
            show_default=False,
        ),
    ] = None,
    compress: Annotated[
        str,
        typer.Option(help="none | int8 | 2bit: what smooth activations keep for backward (lossy but none)."),
    ] = "none",
    json_output: Annotated[bool, typer.Option("--json", help="Print JSON on stdout.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log what happens.")] = False,
) -> None:
    configure_logging(verbose)
    if sum(x is not None for x in (scheme, budget, device)) != 1:
        fail("give exactly one of --scheme NAME, --budget SIZE and --device NAME")
        return
    if compress != "none" and compress not in COMPRESS_MODES:
        fail(f"--compress must be none, int8 or 2bit, got {compress!r}")
        return
    if process_rss and budget is None:
        fail("--process-rss applies to --budget SIZE (a Linux board's --device already budgets the process)")
        return
    if int8_frozen and count_frozen is False:
        fail(
            "--int8-frozen counts frozen weights at 8 bits and --no-count-frozen leaves them out: give one "
            "of them (a microcontroller's --device already keeps int8 weights in flash and checks them there)"
        )
        return
    request = PlanRequest(
        model=model, width_mult=width_mult, resolution=resolution, num_classes=num_classes,
        batch_size=batch_size, scheme=scheme, budget=budget, device=device, int8_frozen=int8_frozen,
        count_frozen=count_frozen, optimizer=optimizer, process_rss=process_rss,
        recompute=recompute, compress=None if compress == "none" else compress,
    )  # fmt: skip
    try:
        payload, text = _run(request, progress=not json_output)
    except BudgetExceededError as exc:
        fail(
            f"{exc}. Flags: --budget or --device, --batch-size, --resolution, --int8-frozen, "
            f"--count-frozen/--no-count-frozen, --recompute/--no-recompute, --compress"
        )
        return
    except OnDeviceError as exc:
        fail(exc)
        return
    if json_output:
        print_json(payload)
    else:
        from rich.markdown import Markdown

        console.print(Markdown(text), soft_wrap=False)


@dataclass(frozen=True)
class PlanRequest:
    """What ``ondevice plan`` was asked, one field per flag (checked by the command before it is built)."""

    model: str
    width_mult: float | None
    resolution: int | None
    num_classes: int
    batch_size: int
    scheme: str | None
    budget: str | None
    device: str | None
    int8_frozen: bool
    count_frozen: bool | None
    optimizer: str | None
    process_rss: bool
    recompute: bool | None = None
    compress: str | None = None

    def model_kwargs(self) -> dict[str, Any]:
        """The zoo model's arguments: the head, and the width and resolution where given."""
        kwargs: dict[str, Any] = {"num_classes": self.num_classes}
        if self.width_mult is not None:
            kwargs["width_mult"] = self.width_mult
        if self.resolution is not None:
            accepted = model_defaults(self.model)
            key = next((k for k in ("resolution", "image_size", "length") if k in accepted), "resolution")
            kwargs[key] = self.resolution
        return kwargs


def _run(request: PlanRequest, *, progress: bool) -> tuple[dict[str, Any], str]:
    kwargs = request.model_kwargs()
    net = create_model(request.model, **kwargs)
    head = {"model": request.model, "model_kwargs": kwargs, "batch_size": request.batch_size}
    if request.scheme is not None:
        prepared = ondevice.prepare(
            net,
            request.scheme,
            recompute=bool(request.recompute),
            compress=request.compress,  # type: ignore[arg-type]  # checked by the command
        )
        report = memory.estimate(
            prepared,
            batch_size=request.batch_size,
            optimizer=request.optimizer,
            frozen_param_bits=8 if request.int8_frozen else 32,
        )
        payload = {**head, "scheme": prepared.scheme.to_dict(), "recompute": list(prepared.recompute),
                   "compress": prepared.compress}  # fmt: skip
        text = report.to_markdown()
        if prepared.recompute:
            blocks = f"{len(prepared.recompute)} block(s) in backward (exact gradients)"
            text = f"Recomputes {blocks}: {', '.join(prepared.recompute)}\n\n{text}"
        return {**payload, "report": report.to_dict()}, text
    budget = _budget(request)
    with console.status("planning (estimating candidate schemes on fake tensors)", spinner="dots") as status:
        if not progress:
            status.stop()
        chosen = memory.plan(net, budget, batch_size=request.batch_size, optimizer=request.optimizer,
                             recompute=request.recompute is not False,
                             compress=request.compress)  # type: ignore[arg-type]  # fmt: skip
    return {**head, "plan": chosen.to_dict()}, chosen.to_markdown()


def _budget(request: PlanRequest) -> memory.Budget:
    """The budget of --device (its own convention) or --budget (of the process with --process-rss), with
    --int8-frozen/--count-frozen applied."""
    if request.device is not None:
        try:
            budget = get_profile(request.device).to_budget()
        except UnknownNameError as exc:
            fail(f"--device {request.device!r}: {exc}; `ondevice devices` lists them")
    elif request.process_rss:
        budget = memory.Budget.for_process(request.budget or "")
    else:
        budget = memory.Budget.parse(request.budget or "", count_frozen_params=False)
    if request.int8_frozen:
        return dataclasses.replace(budget, count_frozen_params=True, frozen_param_bits=8)
    if request.count_frozen is not None:
        return dataclasses.replace(budget, count_frozen_params=request.count_frozen)
    return budget
