"""``ondevice plan``: the memory of a training step under a scheme, or the scheme that fits a budget."""

from __future__ import annotations

from typing import Annotated, Any

import typer

import memory
import ondevice
from devices import get_profile
from ondevice.cli._app import app, configure_logging, console, fail, print_json
from ondevice.errors import BudgetExceededError, OnDeviceError, UnknownNameError
from ondevice.models import create_model, model_defaults

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
says which figure it compares.
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
    json_output: Annotated[bool, typer.Option("--json", help="Print JSON on stdout.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log what happens.")] = False,
) -> None:
    configure_logging(verbose)
    if sum(x is not None for x in (scheme, budget, device)) != 1:
        fail("give exactly one of --scheme NAME, --budget SIZE and --device NAME")
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
    try:
        payload, text = _run(
            model=model, width_mult=width_mult, resolution=resolution, num_classes=num_classes,
            batch_size=batch_size, scheme=scheme, budget=budget, device=device, int8_frozen=int8_frozen,
            count_frozen=count_frozen, optimizer=optimizer, progress=not json_output, process_rss=process_rss,
        )  # fmt: skip
    except BudgetExceededError as exc:
        fail(
            f"{exc}. Flags: --budget or --device, --batch-size, --resolution, --int8-frozen, "
            f"--count-frozen/--no-count-frozen"
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


def _run(**opts: Any) -> tuple[dict[str, Any], str]:
    kwargs: dict[str, Any] = {"num_classes": opts["num_classes"]}
    accepted = model_defaults(opts["model"])
    if opts["width_mult"] is not None:
        kwargs["width_mult"] = opts["width_mult"]
    if opts["resolution"] is not None:
        key = next((k for k in ("resolution", "image_size", "length") if k in accepted), "resolution")
        kwargs[key] = opts["resolution"]
    net = create_model(opts["model"], **kwargs)
    bits = 8 if opts["int8_frozen"] else 32
    if opts["scheme"] is not None:
        prepared = ondevice.prepare(net, opts["scheme"])
        report = memory.estimate(
            prepared, batch_size=opts["batch_size"], optimizer=opts["optimizer"], frozen_param_bits=bits
        )
        payload = {"model": opts["model"], "model_kwargs": kwargs, "batch_size": opts["batch_size"],
                   "scheme": prepared.scheme.to_dict(), "report": report.to_dict()}  # fmt: skip
        return payload, report.to_markdown()
    budget = _budget(opts["device"], opts["budget"], int8_frozen=opts["int8_frozen"],
                     count_frozen=opts["count_frozen"],
                     process_rss=opts.get("process_rss", False))  # fmt: skip
    with console.status("planning (estimating candidate schemes on fake tensors)", spinner="dots") as status:
        if not opts["progress"]:
            status.stop()
        chosen = memory.plan(net, budget, batch_size=opts["batch_size"], optimizer=opts["optimizer"])
    payload = {"model": opts["model"], "model_kwargs": kwargs, "batch_size": opts["batch_size"],
               "plan": chosen.to_dict()}  # fmt: skip
    return payload, chosen.to_markdown()


def _budget(device: str | None, size: str | None, *, int8_frozen: bool, count_frozen: bool | None,
            process_rss: bool = False) -> Any:  # fmt: skip
    """The budget of --device (its own convention) or --budget (of the process with --process-rss), with
    --int8-frozen/--count-frozen applied."""
    import dataclasses

    if device is not None:
        try:
            budget = get_profile(device).to_budget()
        except UnknownNameError as exc:
            fail(f"--device {device!r}: {exc}; `ondevice devices` lists them")
    elif process_rss:
        budget = memory.Budget.for_process(size or "")
    else:
        budget = memory.Budget.parse(size or "", count_frozen_params=False)
    if int8_frozen:
        return dataclasses.replace(budget, count_frozen_params=True, frozen_param_bits=8)
    if count_frozen is not None:
        return dataclasses.replace(budget, count_frozen_params=count_frozen)
    return budget
