"""Everything Flower: ClientApp/ServerApp factories, sparse-update aggregation, compression, simulation.

The entry points::

    import federated
    result = federated.simulate(num_clients=10, rounds=5, scheme="lite_residual", partition="dirichlet:0.3")
    server_app = federated.make_server_app(config)   # for `flwr run` / a deployment
    client_app = federated.make_client_app(config)

Only this package imports Flower; ``import ondevice`` never does.
"""

from federated.apps import RoundRecord, make_client_app, make_server_app
from federated.client import DeviceLearner
from federated.compression import Compression
from federated.config import FederatedConfig
from federated.errors import FederatedError, PayloadError
from federated.partition import Partition
from federated.simulation import SimulationInterrupted, SimulationResult, prestart_engine, simulate

__all__ = [
    "Compression",
    "DeviceLearner",
    "FederatedConfig",
    "FederatedError",
    "Partition",
    "PayloadError",
    "RoundRecord",
    "SimulationInterrupted",
    "SimulationResult",
    "make_client_app",
    "make_server_app",
    "prestart_engine",
    "simulate",
]
