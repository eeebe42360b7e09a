"""Continual-learning benchmark: class-incremental digits, 5 experiences, single pass, over seeds.

The backbone is ``cnn`` pretrained on digits 0-4 from a held-out pool (never part of the stream or the
test sets; digits 5-9 are never seen before the stream); scheme ``last_layer``; every strategy gets the
same stream, optimizer (Adam, lr 0.01), batches of 10 and 4 replay steps per observed batch.

    python bench/continual.py               # table, seed 0
    python bench/continual.py --seeds 5     # seeds 0-4: mean and worst per row, then each seed
    python bench/continual.py --json        # machine-readable
    python bench/continual.py --scenario domain-incremental

A seed re-draws everything random: the pool/stream/test split, the pretraining, the learner and the
stream's order. A learned figure is stated as its mean and worst over seeds (worst: the lowest ACC, the
highest forgetting), since float results also differ between CPU kernel paths.

Rows: naive fine-tuning (lower bound), raw replay (200 samples), 8-bit latent replay (200 samples, and
the same bytes as raw replay), float32 latent replay (200 samples, for the 8-bit ratio), LwF, online EWC.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Any

import torch

import ondevice
from ondevice.continual import LearnerConfig, create_learner, load_scenario, run_scenario

ROWS: list[tuple[str, str, dict[str, Any]]] = [
    ("naive", "naive", {}),
    ("replay (raw, 200)", "replay", {"buffer_size": 200}),
    ("latent 8-bit (200)", "latent-replay", {"buffer_size": 200, "bits": 8}),
    ("latent 8-bit (raw's bytes)", "latent-replay", {"same_bytes": True, "bits": 8}),
    ("latent fp32 (200)", "latent-replay", {"buffer_size": 200, "bits": 32}),
    ("lwf", "lwf", {}),
    ("ewc", "ewc", {}),
]


def run(scenario_name: str, seed: int, pretrain_epochs: int, image_size: int = 8) -> dict[str, Any]:
    scenario = load_scenario(scenario_name, seed=seed, image_size=image_size)
    backbone = scenario.backbone(epochs=pretrain_epochs, seed=seed)
    results: list[dict[str, Any]] = []
    raw_bytes = 0
    for label, strategy, options in ROWS:
        options = dict(options)
        if options.pop("same_bytes", False):
            options["buffer_bytes"] = raw_bytes
            options["buffer_size"] = None
        torch.manual_seed(seed)
        prepared = ondevice.prepare(backbone, "last_layer")
        learner = create_learner(
            prepared,
            strategy,
            optimizer="adam",
            lr=0.01,
            config=LearnerConfig(replay_steps=4, replay_batch_size=32, seed=seed),
            seed=seed,
            **options,
        )
        started = time.perf_counter()
        outcome = run_scenario(learner, scenario, batch_size=10, seed=seed)
        row = {
            "name": label,
            "strategy": strategy,
            **outcome.to_dict(),
            "wall_seconds": time.perf_counter() - started,
        }
        if strategy == "replay":
            raw_bytes = outcome.buffer_bytes
        results.append(row)
        print(f"  {label}: ACC {outcome.metrics.acc:.3f}", file=sys.stderr, flush=True)
    return {
        "scenario": scenario.name,
        "description": scenario.description,
        "pretrain_classes": list(scenario.pretrain_classes),
        "pretrain_samples": len(scenario.pretrain_data),
        "stream_samples": sum(len(e.train) for e in scenario.experiences),
        "scheme": "last_layer",
        "image_size": image_size,
        "model_kwargs": dict(scenario.model_kwargs),
        "seed": seed,
        "rows": results,
    }


def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per row over the seeds' runs: mean and worst ACC (lowest) and forgetting (highest), per-seed ACC."""
    summary = []
    for i, row in enumerate(runs[0]["rows"]):
        accs = [r["rows"][i]["acc"] for r in runs]
        forgetting = [r["rows"][i]["avg_forgetting"] for r in runs]
        summary.append(
            {
                "name": row["name"],
                "seeds": [r["seed"] for r in runs],
                "acc": accs,
                "acc_mean": statistics.fmean(accs),
                "acc_worst": min(accs),
                "avg_forgetting": forgetting,
                "avg_forgetting_mean": statistics.fmean(forgetting),
                "avg_forgetting_worst": max(forgetting),
                "buffer_bytes": row["buffer_bytes"],
            }
        )
    return summary


def to_markdown(payload: dict[str, Any]) -> str:
    lines = [
        f"{payload['scenario']}: {payload['description']} ({payload['stream_samples']} stream samples, "
        f"{payload['image_size']} px, seed {payload['seed']})",
        "",
        "| strategy | ACC | BWT | avg forgetting | buffer samples | bytes/sample | buffer bytes "
        "| samples/s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in payload["rows"]:
        lines.append(
            f"| {r['name']} | {r['acc']:.3f} | {r['bwt']:+.3f} | {r['avg_forgetting']:.3f} | "
            f"{r['buffer_samples'] or '-'} | {r['bytes_per_sample'] or '-'} | {r['buffer_bytes']:,} | "
            f"{r['samples_per_second']:.0f} |"
        )
    return "\n".join(lines)


def summary_markdown(summary: list[dict[str, Any]]) -> str:
    seeds = summary[0]["seeds"]
    lines = [
        f"Over {len(seeds)} seeds ({', '.join(map(str, seeds))}): mean and worst",
        "",
        "| strategy | ACC mean | ACC worst | forgetting mean | forgetting worst | ACC per seed "
        "| buffer bytes |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in summary:
        lines.append(
            f"| {r['name']} | {r['acc_mean']:.3f} | {r['acc_worst']:.3f} | {r['avg_forgetting_mean']:.3f} | "
            f"{r['avg_forgetting_worst']:.3f} | {' / '.join(f'{a:.3f}' for a in r['acc'])} | "
            f"{r['buffer_bytes']:,} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", default="class-incremental")
    parser.add_argument("--seed", type=int, default=0, help="first seed")
    parser.add_argument("--seeds", type=int, default=1, help="how many seeds, from --seed on (default 1)")
    parser.add_argument("--pretrain-epochs", type=int, default=20)
    parser.add_argument(
        "--image-size",
        type=int,
        default=16,
        help="digit side in pixels (default 16: at 8 px a raw digit, 256 B, is smaller than a 128-value "
        "latent, which no camera frame is)",
    )
    parser.add_argument("--json", action="store_true", help="print JSON on stdout instead of a table")
    args = parser.parse_args(argv)
    if args.seeds < 1:
        parser.error(f"--seeds must be at least 1, got {args.seeds}")
    runs = []
    for seed in range(args.seed, args.seed + args.seeds):
        print(f"seed {seed}", file=sys.stderr, flush=True)
        runs.append(run(args.scenario, seed, args.pretrain_epochs, args.image_size))
    payload = {**runs[0], "runs": runs, "summary": summarize(runs)} if len(runs) > 1 else runs[0]
    if args.json:
        print(json.dumps(payload, indent=2, sort_keys=True))
    else:
        if len(runs) > 1:
            print(summary_markdown(payload["summary"]), end="\n\n")
        print("\n\n".join(to_markdown(r) for r in runs))
    return payload


if __name__ == "__main__":
    main()
