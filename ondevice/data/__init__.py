"""Data for on-device learning: the shipped digits, transfer/continual splits, domain shifts, streams,
and tables of samples on disk (``.csv``/``.npy``)."""

from __future__ import annotations

from ondevice.data.digits import DIGITS_MEAN, DIGITS_STD, load_digits
from ondevice.data.splits import (
    DEFAULT_DOMAIN_SHIFTS,
    Experience,
    TransferSplit,
    class_incremental,
    domain_incremental,
    domain_shift,
    stratified_split,
    transfer_split,
)
from ondevice.data.stream import IterableStream, Stream, as_stream
from ondevice.data.tables import load_table
from ondevice.data.tensordata import TensorData

__all__ = [
    "DEFAULT_DOMAIN_SHIFTS",
    "DIGITS_MEAN",
    "DIGITS_STD",
    "Experience",
    "IterableStream",
    "Stream",
    "TensorData",
    "TransferSplit",
    "as_stream",
    "class_incremental",
    "domain_incremental",
    "domain_shift",
    "load_digits",
    "load_table",
    "stratified_split",
    "transfer_split",
]
