"""A fleet inventory: the Raspberry Pis to manage, read from a TOML file and validated field by field.

Example (``examples/fleet/inventory.toml`` has a commented one)::

    [fleet]                                   # defaults for every host; any key may be set per host
    superlink = "192.168.1.10:8000"           # the SuperLink's address (Flower 1.41: one port, 8000)
    root_certificates = "/etc/flower/ca.crt"  # on each Pi: CA certificate that signed the SuperLink's
    user = "pi"
    key = "~/.ssh/id_ed25519"                 # local client key (relative paths: next to this file)
    known_hosts = "~/.ssh/known_hosts"        # local known_hosts; host keys are always verified
    profile = "rpi-4b-4gb"

    [[hosts]]
    name = "pi-kitchen"
    address = "192.168.1.21"
    auth_key = "/etc/flower/supernode.key"    # on the Pi: the SuperNode's authentication private key
    node = { partition_id = 0, num_partitions = 2, state_dir = "/home/pi/ondevice/state" }

``node`` holds exactly the node config keys the ClientApp reads (:mod:`federated.apps`): ``partition_id``,
``num_partitions`` and ``state_dir`` (where the device keeps its learner state across restarts; default
``<remote_dir>/state``, which the SSH user owns).

Host keys are verified against ``known_hosts``. The only way around it is
``insecure_ignore_host_keys = true``, which the CLI reports loudly on every run.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from devices.profiles import get_profile
from ondevice.errors import ConfigError, UnknownNameError

__all__ = ["Host", "Inventory", "InventoryError", "NodeConfig", "load_inventory", "parse_inventory"]

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
_FLOWER_VERSION = re.compile(r"^(\d+)\.(\d+)(?:\.(\d+|\*))?$")


class InventoryError(ConfigError):
    """An inventory file is missing, unreadable or has an invalid field (the message names host and field)."""


@dataclass(frozen=True)
class NodeConfig:
    """What a SuperNode passes to its ClientApp (``--node-config``): the keys :mod:`federated.apps` reads.

    ``state_dir`` empty means the host's default, ``<remote_dir>/state`` (see :attr:`Host.node_config`).
    """

    partition_id: int = 0
    num_partitions: int = 1
    state_dir: str = ""

    def as_flower_string(self) -> str:
        """The ``--node-config`` value: ``partition-id=0 num-partitions=2 state-dir="/home/pi/state"``."""
        text = f"partition-id={self.partition_id} num-partitions={self.num_partitions}"
        return text + (f' state-dir="{self.state_dir}"' if self.state_dir else "")


@dataclass(frozen=True)
class Host:
    """One Pi of the fleet, with every setting resolved (fleet defaults + its own overrides)."""

    name: str
    address: str
    port: int = 22
    user: str = "pi"
    key: Path = Path("~/.ssh/id_ed25519")
    known_hosts: Path = Path("~/.ssh/known_hosts")
    insecure_ignore_host_keys: bool = False
    profile: str = "rpi-4b-4gb"
    node: NodeConfig = field(default_factory=NodeConfig)
    flower_version: str = "1.41.*"
    torch_spec: str = "torch>=2.2,<2.14"
    superlink: str = "127.0.0.1:8000"
    root_certificates: str = "/etc/flower/ca.crt"
    auth_key: str = ""
    remote_dir: str = "/home/{user}/ondevice"
    unit_dir: str = "/etc/systemd/system"
    service: str = "ondevice-supernode"
    use_sudo: bool = True
    python: str = "python3"
    connect_timeout_s: float = 10.0
    command_timeout_s: float = 900.0

    @property
    def remote_root(self) -> str:
        """``remote_dir`` with ``{user}`` and ``{name}`` filled in."""
        return self.remote_dir.format(user=self.user, name=self.name)

    @property
    def state_dir(self) -> str:
        """Where the device keeps its learner state: ``node.state_dir``, else ``<remote_dir>/state``."""
        return self.node.state_dir or f"{self.remote_root}/state"

    @property
    def node_config(self) -> NodeConfig:
        """The node config the SuperNode is started with (``state_dir`` always set)."""
        return replace(self.node, state_dir=self.state_dir)

    @property
    def flower_requirement(self) -> str:
        """The pip requirement for Flower, e.g. ``flwr==1.41.*``."""
        return f"flwr=={self.flower_version}"


@dataclass(frozen=True)
class Inventory:
    """All hosts of an inventory file, in file order."""

    hosts: tuple[Host, ...]
    source: Path | None = None

    def select(self, names: str | list[str] | None) -> list[Host]:
        """The hosts named in ``names`` (a list or a comma-separated string), or all of them."""
        if names is None or names == "" or names == []:
            return list(self.hosts)
        wanted = [n.strip() for n in names.split(",")] if isinstance(names, str) else list(names)
        by_name = {h.name: h for h in self.hosts}
        for name in wanted:
            if name not in by_name:
                raise UnknownNameError("host", name, by_name)
        return [by_name[n] for n in wanted]


_HOST_FIELDS = {f.name: f for f in fields(Host)}
_PATH_FIELDS = {"key", "known_hosts"}
_INT_FIELDS = {"port"}
_FLOAT_FIELDS = {"connect_timeout_s", "command_timeout_s"}
_BOOL_FIELDS = {"insecure_ignore_host_keys", "use_sudo"}


def _where(index: int, name: object) -> str:
    return f"hosts[{index}]" + (f" ({name})" if isinstance(name, str) and name else "")


def _check_field(where: str, key: str, value: Any, base: Path) -> Any:
    def bad(expected: str) -> InventoryError:
        return InventoryError(f"inventory {where}: field {key!r} must be {expected}, got {value!r}")

    if key in _BOOL_FIELDS:
        if not isinstance(value, bool):
            raise bad("true or false")
        return value
    if key in _INT_FIELDS:
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
            raise bad("an integer port in 1..65535")
        return value
    if key in _FLOAT_FIELDS:
        if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
            raise bad("a positive number of seconds")
        return float(value)
    if key == "node":
        return _node(where, value)
    if not isinstance(value, str) or not value.strip():
        raise bad("a non-empty string")
    if key in _PATH_FIELDS:
        path = Path(value).expanduser()
        return path if path.is_absolute() else (base / path)
    if key == "name" and not _NAME.match(value):
        raise bad("1-63 letters, digits, '.', '_' or '-', starting with a letter or digit")
    if key == "flower_version":
        match = _FLOWER_VERSION.match(value)
        if match is None:
            raise bad("a version such as '1.41.*' or '1.41.0'")
    if key == "superlink" and not re.match(r"^[^\s:]+:\d{1,5}$|^\[[0-9a-fA-F:]+\]:\d{1,5}$", value):
        raise bad("HOST:PORT of the SuperLink (Flower 1.41 serves every API on one port, 8000 by default)")
    if key in {"service"} and not re.match(r"^[A-Za-z0-9@._-]+$", value):
        raise bad("a systemd unit name (letters, digits, '@', '.', '_', '-')")
    return value


_NODE_KEYS = ("num_partitions", "partition_id", "state_dir")


def _node(where: str, value: Any) -> NodeConfig:
    if isinstance(value, NodeConfig):
        return value
    if not isinstance(value, dict):
        raise InventoryError(f"inventory {where}: field 'node' must be a table, got {value!r}")
    for key in value:
        if key == "data_path":
            raise InventoryError(
                f"inventory {where}: field 'node.data_path' is not read by the ClientApp (it reads "
                f"{', '.join(_NODE_KEYS)}); remove it, and set state_dir for where the device keeps its state"
            )
        if key not in _NODE_KEYS:
            raise InventoryError(
                f"inventory {where}: unknown field 'node.{key}'; the ClientApp reads {', '.join(_NODE_KEYS)}"
            )
    for key in ("partition_id", "num_partitions"):
        v = value.get(key, 0 if key == "partition_id" else 1)
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise InventoryError(f"inventory {where}: field 'node.{key}' must be an integer >= 0, got {v!r}")
    state_dir = value.get("state_dir", "")
    if "state_dir" in value and (
        not isinstance(state_dir, str) or not state_dir.strip() or any(c in state_dir for c in '"\n\r')
    ):
        raise InventoryError(
            f"inventory {where}: field 'node.state_dir' must be a non-empty path without double quotes "
            f"or newlines, got {state_dir!r}"
        )
    node = NodeConfig(
        partition_id=value.get("partition_id", 0),
        num_partitions=value.get("num_partitions", 1),
        state_dir=state_dir,
    )
    if not 0 <= node.partition_id < node.num_partitions:
        raise InventoryError(
            f"inventory {where}: node.partition_id={node.partition_id} must be in "
            f"[0, num_partitions={node.num_partitions})"
        )
    return node


def parse_inventory(
    data: dict[str, Any], *, base: Path | None = None, source: Path | None = None
) -> Inventory:
    """Validate parsed TOML (``{"fleet": {...}, "hosts": [...]}``) into an :class:`Inventory`."""
    base = base or Path.cwd()
    unknown_top = set(data) - {"fleet", "hosts"}
    if unknown_top:
        raise InventoryError(
            f"inventory: unknown top-level table(s) {sorted(unknown_top)}; use [fleet] and [[hosts]]"
        )
    defaults = data.get("fleet", {})
    if not isinstance(defaults, dict):
        raise InventoryError("inventory: [fleet] must be a table of defaults")
    raw_hosts = data.get("hosts")
    if not isinstance(raw_hosts, list) or not raw_hosts:
        raise InventoryError("inventory: no hosts; add at least one [[hosts]] table with name and address")
    for key in defaults:
        if key not in _HOST_FIELDS or key in {"name", "address"}:
            raise InventoryError(
                f"inventory [fleet]: unknown field {key!r}; valid fields are "
                f"{sorted(set(_HOST_FIELDS) - {'name', 'address'})}"
            )
    resolved_defaults = {k: _check_field("[fleet]", k, v, base) for k, v in defaults.items()}
    hosts: list[Host] = []
    seen: dict[str, int] = {}
    for index, raw in enumerate(raw_hosts):
        name = raw.get("name") if isinstance(raw, dict) else None
        where = _where(index, name)
        if not isinstance(raw, dict):
            raise InventoryError(f"inventory {where}: each [[hosts]] entry must be a table")
        for required in ("name", "address"):
            if required not in raw:
                raise InventoryError(f"inventory {where}: missing required field {required!r}")
        for key in raw:
            if key not in _HOST_FIELDS:
                raise InventoryError(
                    f"inventory {where}: unknown field {key!r}; valid fields are {sorted(_HOST_FIELDS)}"
                )
        values = dict(resolved_defaults)
        values.update({k: _check_field(where, k, v, base) for k, v in raw.items()})
        if values["name"] in seen:
            raise InventoryError(
                f"inventory {where}: duplicate host name {values['name']!r} "
                f"(also hosts[{seen[values['name']]}])"
            )
        seen[values["name"]] = index
        hosts.append(Host(**values))
    _check_fleet(hosts)
    return Inventory(hosts=tuple(hosts), source=source)


def _check_fleet(hosts: list[Host]) -> None:
    first = hosts[0]
    first_minor = _FLOWER_VERSION.match(first.flower_version).groups()[:2]  # type: ignore[union-attr]
    for index, host in enumerate(hosts):
        where = _where(index, host.name)
        try:
            get_profile(host.profile)
        except UnknownNameError as error:
            raise InventoryError(f"inventory {where}: field 'profile': {error}") from None
        minor = _FLOWER_VERSION.match(host.flower_version).groups()[:2]  # type: ignore[union-attr]
        if minor != first_minor:
            raise InventoryError(
                f"inventory {where}: field 'flower_version' {host.flower_version!r} differs in major.minor "
                f"from {first.name}'s {first.flower_version!r}; SuperLink and SuperNodes must share "
                "major.minor"
            )


def load_inventory(path: str | Path) -> Inventory:
    """Read and validate an inventory TOML file; relative local paths are resolved next to it."""
    file = Path(path).expanduser()
    try:
        data = tomllib.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InventoryError(f"inventory file {str(file)!r} does not exist; pass --inventory PATH") from None
    except tomllib.TOMLDecodeError as error:
        raise InventoryError(f"inventory file {str(file)!r} is not valid TOML: {error}") from None
    except UnicodeDecodeError as error:
        raise InventoryError(
            f"inventory file {str(file)!r} is not UTF-8 text (byte {error.start}: {error.reason}); "
            "an inventory is a TOML file, see examples/fleet/inventory.toml"
        ) from None
    except OSError as error:
        raise InventoryError(
            f"inventory file {str(file)!r} cannot be read ({error.strerror or error}); "
            "pass a readable TOML file with --inventory PATH"
        ) from None
    return parse_inventory(data, base=file.resolve().parent, source=file)
