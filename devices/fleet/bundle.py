"""What provisioning copies to every Pi: the ondevice wheel, the shared pretrained backbone files and,
for Pis without internet, a wheelhouse.

The wheel is built here from the source checkout (``pip wheel --no-deps``), so a Pi never needs the
repository; the backbone files are the server's ``<cache>/pretrained/*.safetensors``: the server sends a
digest of the frozen backbone each round and a device whose backbone differs refuses the round, so every
device must hold the server's files rather than pretrain its own. A wheelhouse is a folder of wheels for
the Pis' platform (pinned flwr and torch and every dependency of them and of ondevice), filled on a
machine with internet by :data:`WHEELHOUSE_COMMAND`; provisioning copies it and installs with
``pip install --no-index --find-links``, so the Pi needs no package index.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import ondevice
from ondevice.errors import ConfigError
from ondevice.pretrain import default_cache_dir

__all__ = [
    "WHEELHOUSE_COMMAND",
    "Bundle",
    "BundleError",
    "build_lock",
    "build_lock_path",
    "build_wheel",
    "find_backbones",
    "source_root",
]

WHEELHOUSE_COMMAND = (
    "pip download -d WHEELHOUSE --only-binary=:all: --python-version 3.11 "
    "--platform manylinux_2_28_aarch64 --platform manylinux2014_aarch64 "
    "'flwr==1.41.*' 'torch==2.13.0' dist/ondevice-*.whl"
)
"""How to fill a wheelhouse for 64-bit Raspberry Pi OS (Bookworm: aarch64, Python 3.11, glibc 2.36) on a
machine with internet: the ondevice wheel's dependencies and the pinned flwr and torch (PyPI's aarch64
torch wheels are CPU-only; recent ones are tagged manylinux_2_28, numpy's and most others'
manylinux2014). The flwr and torch pins must match the inventory's ``flower_version`` and ``torch``."""

_REQUIRED_IN_WHEELHOUSE = ("flwr", "torch")


class BundleError(ConfigError):
    """The wheel cannot be built or a backbone file is missing (the message says what to pass instead)."""


@dataclass(frozen=True)
class Bundle:
    """Local files provisioning copies over SFTP: one wheel, the backbone files and, optionally, a
    wheelhouse (a folder of wheels for the Pis' platform; with it the Pis install with no package index)."""

    wheel: Path
    backbones: tuple[Path, ...]
    wheelhouse: Path | None = None

    def __post_init__(self) -> None:
        if self.wheel.suffix != ".whl" or not self.wheel.is_file():
            raise BundleError(
                f"{self.wheel} is not a wheel file; pass a .whl built with `pip wheel --no-deps .`"
            )
        self.check_sources(self.backbones, self.wheelhouse)

    @classmethod
    def check_sources(cls, backbones: tuple[Path, ...], wheelhouse: Path | None) -> None:
        """Refuse missing backbone files or a bad wheelhouse (``BundleError``): everything but the wheel,
        which ``fleet provision`` checks this way before it spends time building one."""
        if not backbones:
            raise BundleError(
                "no pretrained backbone to copy; pass --backbone PATH (the server's "
                "<cache>/pretrained/<model>-<hash>.safetensors), or pretrain once on this machine "
                "(`ondevice simulate` does)"
            )
        for path in backbones:
            if not path.is_file():
                raise BundleError(f"backbone file {path} does not exist")
        if wheelhouse is not None:
            cls.check_wheelhouse(wheelhouse)

    @staticmethod
    def check_wheelhouse(folder: Path) -> None:
        """Refuse a wheelhouse that is not a folder or lacks the flwr or torch wheel (``BundleError``)."""
        if not folder.is_dir():
            raise BundleError(
                f"wheelhouse {folder} is not a folder; pass --wheelhouse DIR, a folder filled with "
                f"`{WHEELHOUSE_COMMAND}`"
            )
        names = {_distribution(path) for path in folder.glob("*.whl")}
        missing = [name for name in _REQUIRED_IN_WHEELHOUSE if name not in names]
        if missing:
            found = ", ".join(sorted(names)) or "no wheels"
            raise BundleError(
                f"wheelhouse {folder} has no {' or '.join(missing)} wheel (it holds {found}); the Pis "
                f"install from it with no package index, so fill it with `{WHEELHOUSE_COMMAND}`"
            )

    @property
    def wheelhouse_files(self) -> tuple[Path, ...]:
        """The wheels of the wheelhouse, sorted by name (none without a wheelhouse)."""
        return tuple(sorted(self.wheelhouse.glob("*.whl"))) if self.wheelhouse is not None else ()


def _distribution(wheel: Path) -> str:
    """The normalised distribution name of a wheel file (``Flwr-1.41.0-py3-none-any.whl`` -> ``flwr``)."""
    return wheel.name.split("-", 1)[0].lower().replace("_", "-").replace(".", "-")


def source_root() -> Path:
    """The checkout ``ondevice`` is imported from (the folder with its ``pyproject.toml``)."""
    root = Path(ondevice.__file__).resolve().parents[1]
    if not (root / "pyproject.toml").is_file():
        raise BundleError(
            f"ondevice is installed from {root}, not from a source checkout; pass --wheel PATH to a wheel "
            "built with `pip wheel --no-deps` in the checkout"
        )
    return root


def build_lock_path(root: Path) -> Path:
    """The lock file that serialises wheel builds of the source tree ``root`` (see :func:`build_lock`)."""
    digest = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"ondevice-wheel-build-{digest}.lock"


@contextmanager
def build_lock(root: Path) -> Iterator[None]:
    """Hold the tree's build lock: setuptools builds inside ``root`` (``build/``, ``*.egg-info``), so two
    builds of one tree at once (two ``fleet provision`` runs, parallel tests) break each other. Waits for a
    build in progress; where there is no ``fcntl`` (Windows), nothing is locked."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    with build_lock_path(root).open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def build_wheel(out_dir: Path, *, root: Path | None = None, timeout_s: float = 600.0) -> Path:
    """Build the ondevice wheel from ``root`` (default: :func:`source_root`) into ``out_dir``; its path.

    Runs ``python -m pip wheel --no-deps --no-build-isolation``: the build backend (setuptools) must be
    installed here, and nothing is downloaded. One build of a tree at a time (:func:`build_lock`).
    """
    root = root or source_root()
    out_dir.mkdir(parents=True, exist_ok=True)
    before = set(out_dir.glob("*.whl"))
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"]
    with build_lock(root):
        done = subprocess.run(
            [*command, "--wheel-dir", str(out_dir), str(root)],
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )
    if done.returncode != 0:
        tail = " | ".join((done.stderr or done.stdout).strip().splitlines()[-3:])
        raise BundleError(f"building the ondevice wheel in {root} failed: {tail}; pass --wheel PATH instead")
    wheels = sorted(set(out_dir.glob("ondevice-*.whl")) - before) or sorted(out_dir.glob("ondevice-*.whl"))
    if not wheels:
        raise BundleError(f"pip wheel wrote no ondevice-*.whl into {out_dir}")
    return wheels[-1]


def find_backbones(cache_dir: Path | None = None) -> tuple[Path, ...]:
    """The pretrained backbone files in ``cache_dir`` (default: this machine's ondevice cache)."""
    folder = (cache_dir or default_cache_dir()) / "pretrained"
    return tuple(sorted(folder.glob("*.safetensors"))) if folder.is_dir() else ()
