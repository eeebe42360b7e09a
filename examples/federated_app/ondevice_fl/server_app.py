"""ServerApp: reads ``federated.FederatedConfig`` from the run config (``[tool.flwr.app.config]``)."""

from federated import make_server_app

app = make_server_app()
