"""A fleet of Raspberry Pis over SSH: inventory (TOML), provisioning, systemd control of Flower SuperNodes.

Needs the ``fleet`` extra (``asyncssh``), which is imported only when a command runs, so inventories can
be validated without it.
"""

from devices.fleet.bundle import Bundle, BundleError, build_wheel, find_backbones
from devices.fleet.commands import Action, HostResult, Outcome, run_action, run_fleet, summary
from devices.fleet.inventory import Host, Inventory, InventoryError, NodeConfig, load_inventory
from devices.fleet.remote import render_supernode_unit

__all__ = [
    "Action",
    "Bundle",
    "BundleError",
    "Host",
    "HostResult",
    "Inventory",
    "InventoryError",
    "NodeConfig",
    "Outcome",
    "build_wheel",
    "find_backbones",
    "load_inventory",
    "render_supernode_unit",
    "run_action",
    "run_fleet",
    "summary",
]
