"""The ondevice federated app: thin Flower entry points over ``federated.make_*_app``."""
