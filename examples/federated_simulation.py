"""Ten simulated devices learn the ten digits together with lite-residual updates (Flower simulation).

Run: ``python examples/federated_simulation.py`` (``--quick``: 3 devices, 2 rounds). The backbone is
pretrained on digits 0-4 (cached);
each device holds a Dirichlet(0.3) share of the digits, learns it with its continual learner and sends
only its small trainable tensors (lite residual branches, biases, head) in fp16, and the server
averages them and steps with momentum 0.5 (FedAvgM): the configuration of ``bench/federated.py``'s claim
row, tuned on seeds that bench never reports.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")

import federated


def main(argv: list[str] | None = None) -> federated.SimulationResult:
    """Run the federation and print accuracy per round and bytes per round."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 devices, 2 rounds, 1 local epoch")
    args = parser.parse_args(argv)
    config = federated.FederatedConfig(
        scheme={
            "name": "lite_residual",
            "expand": 0.25,
            "kernel_size": 3,
            "groups": 8,
            "downsample": 1,
            "update_norm_stats": False,
        },
        partition="dirichlet:0.3",
        num_clients=3 if args.quick else 10,
        rounds=2 if args.quick else 5,
        local_epochs=1 if args.quick else 4,
        lr=1e-2,
        aggregation="fedavg",
        server_momentum=0.5,
        strategy="naive",
        compression="fp16",
        downlink="fp16",
    )
    result = federated.simulate(
        config, on_round=lambda r: print(f"round {r.round}: accuracy {r.accuracy:.4f}")
    )
    print(f"final accuracy {result.final_accuracy:.4f}, {result.bytes_per_round:,.0f} bytes per round")
    return result


if __name__ == "__main__":
    main()
