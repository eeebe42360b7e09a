"""``ondevice plan``: the memory of a training step under a scheme, or the scheme that fits a budget."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from ondevice.cli._app import app, configure_logging, console, fail, print_json
from ondevice.errors import OnDeviceError

_HELP = """Estimate the memory of one training step (no compute: fake tensors), or plan the update scheme.

With --scheme NAME, print that scheme's memory report. With --budget SIZE (e.g. 256KB) or --device NAME
(a device profile's training budget), choose the scheme that fits and promises the most accuracy
(tiny-training's contribution analysis + search, with a prior). What counts against a budget:
activations + trainable parameters + gradients + optimizer state (+ frozen weights when the budget
counts them, at 8 bits with --int8-frozen).
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
        bool, typer.Option("--int8-frozen", help="Count frozen weights at 8 bits (MCU deployment).")
    ] = False,
    count_frozen: Annotated[
        bool, typer.Option("--count-frozen", help="Frozen weights count against the budget too.")
    ] = False,
    optimizer: Annotated[str | None, typer.Option(help="sgd | adam (default: SGD with momentum).")] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print JSON on stdout.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log what happens.")] = False,
) -> None:
    configure_logging(verbose)
    if sum(x is not None for x in (scheme, budget, device)) != 1:
        fail("give exactly one of --scheme NAME, --budget SIZE and --device NAME")
        return
    try:
        payload, text = _run(
            model=model, width_mult=width_mult, resolution=resolution, num_classes=num_classes,
            batch_size=batch_size, scheme=scheme, budget=budget, device=device, int8_frozen=int8_frozen,
            count_frozen=count_frozen, optimizer=optimizer, progress=not json_output,
        )  # fmt: skip
    except OnDeviceError as exc:
        fail(exc)
        return
    if json_output:
        print_json(payload)
    else:
        from rich.markdown import Markdown

        console.print(Markdown(text))


def _run(**opts: Any) -> tuple[dict[str, Any], str]:
    import memory
    import ondevice
    from ondevice.models import create_model, model_defaults

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
    if opts["device"] is not None:
        from devices import get_profile

        budget = memory.Budget.from_profile(
            get_profile(opts["device"]), count_frozen_params=opts["count_frozen"], frozen_param_bits=bits
        )
    else:
        budget = memory.Budget.parse(
            opts["budget"], count_frozen_params=opts["count_frozen"], frozen_param_bits=bits
        )
    with console.status("planning (estimating candidate schemes on fake tensors)", spinner="dots") as status:
        if not opts["progress"]:
            status.stop()
        chosen = memory.plan(net, budget, batch_size=opts["batch_size"], optimizer=opts["optimizer"])
    payload = {"model": opts["model"], "model_kwargs": kwargs, "batch_size": opts["batch_size"],
               "plan": chosen.to_dict()}  # fmt: skip
    return payload, chosen.to_markdown()
