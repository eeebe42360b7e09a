"""What provisioning copies to every Pi: the ondevice wheel and the shared pretrained backbone files.

The wheel is built here from the source checkout (``pip wheel --no-deps``), so a Pi never needs the
repository; the backbone files are the server's ``<cache>/pretrained/*.safetensors``: the server sends a
digest of the frozen backbone each round and a device whose backbone differs refuses the round, so every
device must hold the server's files rather than pretrain its own.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import ondevice
from ondevice.errors import ConfigError
from ondevice.pretrain import default_cache_dir

__all__ = ["Bundle", "BundleError", "build_wheel", "find_backbones", "source_root"]


class BundleError(ConfigError):
    """The wheel cannot be built or a backbone file is missing (the message says what to pass instead)."""


@dataclass(frozen=True)
class Bundle:
    """Local files provisioning copies over SFTP: one wheel and the backbone files."""

    wheel: Path
    backbones: tuple[Path, ...]

    def __post_init__(self) -> None:
        if self.wheel.suffix != ".whl" or not self.wheel.is_file():
            raise BundleError(
                f"{self.wheel} is not a wheel file; pass a .whl built with `pip wheel --no-deps .`"
            )
        if not self.backbones:
            raise BundleError(
                "no pretrained backbone to copy; pass --backbone PATH (the server's "
                "<cache>/pretrained/<model>-<hash>.safetensors), or pretrain once on this machine "
                "(`ondevice simulate` does)"
            )
        for path in self.backbones:
            if not path.is_file():
                raise BundleError(f"backbone file {path} does not exist")


def source_root() -> Path:
    """The checkout ``ondevice`` is imported from (the folder with its ``pyproject.toml``)."""
    root = Path(ondevice.__file__).resolve().parents[1]
    if not (root / "pyproject.toml").is_file():
        raise BundleError(
            f"ondevice is installed from {root}, not from a source checkout; pass --wheel PATH to a wheel "
            "built with `pip wheel --no-deps` in the checkout"
        )
    return root


def build_wheel(out_dir: Path, *, root: Path | None = None, timeout_s: float = 600.0) -> Path:
    """Build the ondevice wheel from ``root`` (default: :func:`source_root`) into ``out_dir``; its path.

    Runs ``python -m pip wheel --no-deps --no-build-isolation``: the build backend (setuptools) must be
    installed here, and nothing is downloaded.
    """
    root = root or source_root()
    out_dir.mkdir(parents=True, exist_ok=True)
    before = set(out_dir.glob("*.whl"))
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"]
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
