"""Continual-learning benchmark: class-incremental digits, single pass, batches of 10, over seeds.

Two settings, each over seeds 0-4 by default (mean and worst per row):

- ``scratch``: ``class-incremental`` at 8 px from a randomly initialised ``cnn`` trained under ``full``;
  5 experiences of 2 classes, Adam lr 1e-3, 4 optimizer steps per incoming batch, replay batches of 32,
  a 200-sample buffer (class-balanced reservoir for the SDK's rows, its default; plain reservoir in the
  reference loop).
- ``pretrained``: ``class-incremental-novel`` at 16 px: the ``cnn`` is pretrained on digits 0-3 only and
  the stream brings digits 4-9 (3 experiences of 2 classes), so no stream class was seen in pretraining;
  scheme ``last_layer`` (the frozen front makes latent replay possible), same steps and buffer.

Rows: naive fine-tuning; ER (the SDK's default recipe: every step trains the incoming batch with a fresh
replay draw); ER "once" (the incoming batch only in the first step, the old recipe); DER++ (logits in the
buffer); latent ER / DER++ in 8 bits (and ER in float32) in the pretrained setting; LwF and online EWC;
and ``reference ER``, a plain experience-replay loop written here in ~40 lines without the SDK's Learner
(reservoir buffer of raw inputs, a head fixed to the stream's classes).

The settings were tuned on seeds 100-102, which are never reported (``--tune`` reruns the grid in
``TUNE_GRID``): from scratch the recipe, head (grown or fixed), buffer policy, lr and DER++'s alpha/beta
(the issue's lr 1e-3 stayed best), the reference loop's and naive's lr over the same grid; pretrained,
the lr of ER (both recipes) and of the reference loop over 1e-3..1e-1, each row then run at its own best
(ER 0.1, ER once and the reference 0.03). DER++, latent replay, LwF and EWC use ER's lr there (not
tuned separately). A fixed head was worse than a growing one from scratch, so the SDK rows grow the head;
the reference loop keeps its fixed head, as plain ER loops do.

    python bench/continual.py                      # both settings, seeds 0-4: mean / worst table
    python bench/continual.py --setting scratch --seeds 1
    python bench/continual.py --json               # machine-readable
    python bench/continual.py --tune               # the tuning grid on seeds 100-102
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

import ondevice
from ondevice.continual import ContinualMetrics, LearnerConfig, create_learner, load_scenario, run_scenario
from ondevice.continual.scenarios import Scenario
from ondevice.data import Stream


@dataclass(frozen=True)
class Setting:
    name: str
    scenario: str
    image_size: int
    scheme: str
    pretrained: bool
    lr: float


SETTINGS = {
    "scratch": Setting("scratch", "class-incremental", 8, "full", False, 1e-3),
    "pretrained": Setting("pretrained", "class-incremental-novel", 16, "last_layer", True, 1e-1),
}


@dataclass(frozen=True)
class Row:
    name: str
    strategy: str  # a create_learner strategy, or "reference" for the plain loop below
    options: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    settings: tuple[str, ...] = ("scratch", "pretrained")
    lr: dict[str, float] = field(
        default_factory=dict
    )  # a row's own tuned lr per setting, if not the setting's


ROWS = (
    Row("naive", "naive"),
    Row("ER", "replay"),
    Row("ER once (old recipe)", "replay", config={"recipe": "once"}, lr={"pretrained": 3e-2}),
    Row("DER++", "der"),
    Row("reference ER loop", "reference", lr={"pretrained": 3e-2}),
    Row("latent ER 8-bit", "latent-replay", {"bits": 8}, settings=("pretrained",)),
    Row("latent ER fp32", "latent-replay", {"bits": 32}, settings=("pretrained",)),
    Row("latent DER++ 8-bit", "latent-der", {"bits": 8}, settings=("pretrained",)),
    Row("lwf", "lwf"),
    Row("ewc", "ewc"),
)

BUFFER_SIZE, STEPS, REPLAY_BATCH, BATCH = 200, 4, 32, 10


def reference_er(
    model: nn.Module, scenario: Scenario, *, seed: int, lr: float, train_features: bool
) -> tuple[list[list[float]], int]:
    """A plain online experience-replay loop, independent of the SDK's Learner: for every incoming batch,
    ``STEPS`` Adam steps on the batch together with a fresh draw of ``REPLAY_BATCH`` from a reservoir
    buffer, then the batch goes into the reservoir. Returns the accuracy matrix and the buffer's bytes."""
    classes = sorted({c for e in scenario.experiences for c in e.classes})
    model.classifier = nn.Linear(model.classifier.in_features, len(classes))  # type: ignore[union-attr]
    params = [p for n, p in model.named_parameters() if train_features or n.startswith("classifier.")]
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(params, lr=lr)
    gen = torch.Generator().manual_seed(seed)
    buf_x: list[torch.Tensor] = []
    buf_y: list[int] = []
    seen = 0
    matrix: list[list[float]] = []
    for i, exp in enumerate(scenario.experiences):
        for x, y in Stream(exp.train, batch_size=BATCH, shuffle=True, seed=seed + i):
            model.train() if train_features else model.eval()
            for _ in range(STEPS):
                bx, by = x, y
                if buf_x:
                    idx = torch.randperm(len(buf_x), generator=gen)[:REPLAY_BATCH]
                    bx = torch.cat([x, torch.stack([buf_x[j] for j in idx])])
                    by = torch.cat([y, torch.tensor([buf_y[j] for j in idx])])
                loss = F.cross_entropy(model(bx), by)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            for xi, yi in zip(x, y, strict=True):
                seen += 1
                if len(buf_x) < BUFFER_SIZE:
                    buf_x.append(xi.clone())
                    buf_y.append(int(yi))
                else:
                    j = int(torch.randint(seen, (1,), generator=gen))
                    if j < BUFFER_SIZE:
                        buf_x[j], buf_y[j] = xi.clone(), int(yi)
        model.eval()
        with torch.no_grad():
            matrix.append(
                [float((model(e.test.x).argmax(-1) == e.test.y).float().mean()) for e in scenario.experiences]
            )
    return matrix, BUFFER_SIZE * (buf_x[0].numel() * 4 + 2)


def _model(setting: Setting, scenario: Scenario, seed: int) -> nn.Module:
    if setting.pretrained:
        return scenario.backbone(epochs=20, seed=seed)
    torch.manual_seed(seed)
    return ondevice.create_model(scenario.model, num_classes=2, **scenario.model_kwargs)


def run_row(
    setting: Setting, scenario: Scenario, row: Row, seed: int, overrides: dict[str, Any] | None = None
) -> dict[str, Any]:
    """One row on one seed: ACC, forgetting and bytes; ``overrides`` (lr, head, config fields) for tuning."""
    extra = dict(overrides or {})
    lr = float(extra.pop("lr", row.lr.get(setting.name, setting.lr)))
    fixed_head = bool(extra.pop("fixed_head", False))
    model = _model(setting, scenario, seed)
    started = time.perf_counter()
    if row.strategy == "reference":
        torch.manual_seed(seed)
        matrix, buffer_bytes = reference_er(
            model, scenario, seed=seed, lr=lr, train_features=setting.scheme == "full"
        )
        metrics = ContinualMetrics.from_matrix(matrix)
        samples = BUFFER_SIZE
        per_sample = buffer_bytes // BUFFER_SIZE
    else:
        torch.manual_seed(seed)
        classes = len({c for e in scenario.experiences for c in e.classes})
        options: dict[str, Any] = dict(row.options)
        if row.strategy in ("replay", "der", "latent-replay", "latent-der"):
            options.update(buffer_size=BUFFER_SIZE, policy=extra.pop("policy", "class_balanced"))
        config = LearnerConfig(
            replay_steps=STEPS, replay_batch_size=REPLAY_BATCH, seed=seed, **{**row.config, **extra}
        )
        learner = create_learner(
            ondevice.prepare(model, setting.scheme),
            row.strategy,
            optimizer="adam",
            lr=lr,
            config=config,
            num_classes=classes if fixed_head else None,
            seed=seed,
            **options,
        )
        outcome = run_scenario(learner, scenario, batch_size=BATCH, seed=seed)
        metrics, buffer_bytes = outcome.metrics, outcome.buffer_bytes
        samples, per_sample = outcome.buffer_samples, outcome.bytes_per_sample
    return {
        "name": row.name,
        "strategy": row.strategy,
        "seed": seed,
        "acc": metrics.acc,
        "avg_forgetting": metrics.avg_forgetting,
        "buffer_samples": samples,
        "bytes_per_sample": per_sample,
        "buffer_bytes": buffer_bytes,
        "seconds": time.perf_counter() - started,
    }


def run_setting(setting: Setting, seeds: list[int]) -> dict[str, Any]:
    rows = [r for r in ROWS if setting.name in r.settings]
    per_seed: dict[str, list[dict[str, Any]]] = {r.name: [] for r in rows}
    for seed in seeds:
        scenario = load_scenario(setting.scenario, seed=seed, image_size=setting.image_size)
        for row in rows:
            result = run_row(setting, scenario, row, seed)
            per_seed[row.name].append(result)
            print(f"  {setting.name} seed {seed} {row.name}: ACC {result['acc']:.3f}", file=sys.stderr)
    summary = []
    for name, results in per_seed.items():
        accs = [r["acc"] for r in results]
        row = next(r for r in rows if r.name == name)
        forgetting = [r["avg_forgetting"] for r in results]
        summary.append(
            {
                "name": name,
                "lr": row.lr.get(setting.name, setting.lr),
                "acc": accs,
                "acc_mean": statistics.fmean(accs),
                "acc_worst": min(accs),
                "avg_forgetting_mean": statistics.fmean(forgetting),
                "avg_forgetting_worst": max(forgetting),
                "bytes_per_sample": results[0]["bytes_per_sample"],
                "buffer_bytes": results[0]["buffer_bytes"],
            }
        )
    return {"setting": setting.name, **vars(setting), "seeds": seeds, "summary": summary, "runs": per_seed}


def to_markdown(payload: dict[str, Any]) -> str:
    lines = [
        f"{payload['setting']}: {payload['scenario']}, {payload['image_size']} px, "
        f"scheme {payload['scheme']}, Adam lr {payload['lr']:g}, "
        f"seeds {', '.join(map(str, payload['seeds']))}",
        "",
        "| row | lr | ACC mean | ACC worst | forgetting mean | forgetting worst | ACC per seed "
        "| bytes/sample |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in payload["summary"]:
        lines.append(
            f"| {r['name']} | {r['lr']:g} | {r['acc_mean']:.3f} | {r['acc_worst']:.3f} | "
            f"{r['avg_forgetting_mean']:.3f} | "
            f"{r['avg_forgetting_worst']:.3f} | {' / '.join(f'{a:.3f}' for a in r['acc'])} | "
            f"{r['bytes_per_sample'] or '-'} |"
        )
    return "\n".join(lines)


TUNE_SEEDS = [100, 101, 102]
TUNE_GRID: dict[str, list[tuple[str, dict[str, list[Any]]]]] = {
    # What was run on seeds 100-102 to choose the settings (lr 1e-3 from scratch unless given).
    "scratch": [
        (
            "ER",
            {
                "recipe": ["er", "once"],
                "fixed_head": [False, True],
                "policy": ["reservoir", "class_balanced"],
            },
        ),
        ("ER", {"lr": [5e-4, 2e-3], "recipe": ["er", "once"]}),
        ("reference ER loop", {"lr": [5e-4, 1e-3, 2e-3]}),
        ("naive", {"lr": [5e-4, 1e-3, 2e-3]}),
        ("DER++", {"recipe": ["er", "once"], "der_alpha": [0.03, 0.1, 0.3], "der_beta": [1.0, 3.2]}),
    ],
    "pretrained": [
        ("ER", {"lr": [1e-3, 3e-3, 1e-2, 3e-2, 1e-1], "recipe": ["er", "once"]}),
        ("reference ER loop", {"lr": [1e-3, 3e-3, 1e-2, 3e-2, 1e-1]}),
    ],
}


def tune(names: list[str], rows: list[str] | None = None) -> list[dict[str, Any]]:
    """Every grid point of every tuned row on the tuning seeds: mean and worst ACC."""
    out = []
    for setting_name in names:
        setting = SETTINGS[setting_name]
        scenarios = {
            s: load_scenario(setting.scenario, seed=s, image_size=setting.image_size) for s in TUNE_SEEDS
        }
        for index, (row_name, grid) in enumerate(TUNE_GRID[setting_name]):
            if rows is not None and row_name not in rows and str(index) not in rows:
                continue
            row = next(r for r in ROWS if r.name == row_name)
            for values in itertools.product(*grid.values()):
                point = dict(zip(grid, values, strict=True))
                accs = [run_row(setting, scenarios[s], row, s, point)["acc"] for s in TUNE_SEEDS]
                result = {
                    "setting": setting_name,
                    "row": row_name,
                    **point,
                    "acc_mean": statistics.fmean(accs),
                    "acc_worst": min(accs),
                }
                print(json.dumps(result), flush=True)
                out.append(result)
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setting", choices=[*SETTINGS, "both"], default="both")
    parser.add_argument("--seed", type=int, default=0, help="first seed (default 0)")
    parser.add_argument("--seeds", type=int, default=5, help="how many seeds from --seed on (default 5)")
    parser.add_argument("--json", action="store_true", help="print JSON on stdout instead of tables")
    parser.add_argument("--tune", action="store_true", help="run the tuning grid on seeds 100-102")
    parser.add_argument(
        "--tune-rows", nargs="*", default=None, help="with --tune: only these rows (names or grid indices)"
    )
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.seeds < 1:
        parser.error(f"--seeds must be at least 1, got {args.seeds}")
    names = list(SETTINGS) if args.setting == "both" else [args.setting]
    if args.tune:
        return {"tuning": tune(names, args.tune_rows)}
    seeds = list(range(args.seed, args.seed + args.seeds))
    payload = {"settings": [run_setting(SETTINGS[n], seeds) for n in names]}
    if args.json:
        print(json.dumps(payload, indent=2, sort_keys=True))
    else:
        print("\n\n".join(to_markdown(p) for p in payload["settings"]))
    return payload


if __name__ == "__main__":
    main()
