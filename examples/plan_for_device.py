"""Plan on-device training for a microcontroller: which tensors to train so a step fits its SRAM.

Run: ``python examples/plan_for_device.py [--device stm32f746] [--model mcunet]``. No data is needed (a
prior ranks layers, as tiny-training observed); nothing is computed (memory comes from fake tensors).
"""

from __future__ import annotations

import argparse

import memory
from devices import get_profile
from ondevice.models import create_model


def main(argv: list[str] | None = None) -> memory.Plan:
    """Plan for the device and print the chosen scheme with its memory report."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="stm32f746")
    parser.add_argument("--model", default="mcunet", choices=["mcunet", "mobilenetv2"])
    parser.add_argument("--resolution", type=int, default=128)
    args = parser.parse_args(argv)

    model = create_model(args.model, width_mult=0.35, resolution=args.resolution, num_classes=10)
    budget = get_profile(args.device).to_budget()  # an MCU keeps int8 frozen weights in flash
    chosen = memory.plan(model, budget, batch_size=1)
    print(chosen.to_markdown(top=6))
    print(f"train with: ondevice.prepare(model, {chosen.scheme!r})")
    return chosen


if __name__ == "__main__":
    main()
