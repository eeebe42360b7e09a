"""ClientApp: follows the server's validated configuration; node config gives partition and state dir."""

from federated import make_client_app

app = make_client_app()
