"""Update schemes: which tensors of a pretrained model train on the device.

A scheme is data: a frozen, JSON-serialisable, versioned dataclass. ``ondevice.prepare(model, scheme)``
turns it into a prepared model; ``resolve_scheme`` accepts a scheme, its name or its ``to_dict()`` form.

| name            | what trains                                                                        |
|-----------------|------------------------------------------------------------------------------------|
| ``full``        | every parameter (norm statistics update too)                                       |
| ``last_layer``  | the classifier head                                                                |
| ``bias``        | every parameter named ``bias`` (norm shifts included) + the head (TinyTL)          |
| ``lite_residual`` | TinyTL lite residual branches + (optionally) biases + the head                  |
| ``sparse``      | biases of the last k layers, weights of chosen layers, optionally on a fraction of |
|                 | their input channels (tiny-training's sparse update)                               |
| ``lora``        | low-rank adapters on Linear layers (+ the head)                                    |

Each scheme is one folder here: its configuration, the modules it attaches, its memory-saving op if it
has one, and the applicator that changes a model (registered with ``base.register_applier``). The
imports below are the registry: a scheme is available once its folder is imported, and adding one is a
new folder plus one line here.
"""

from ondevice.schemes.base import SCHEME_VERSION, Scheme, list_schemes, register_scheme, resolve_scheme

# The registry: one line per scheme folder.
from ondevice.schemes.full import Full  # isort: skip
from ondevice.schemes.last_layer import LastLayer  # isort: skip
from ondevice.schemes.bias import Bias  # isort: skip
from ondevice.schemes.lite_residual import LiteResidual  # isort: skip
from ondevice.schemes.sparse import Sparse  # isort: skip
from ondevice.schemes.lora import LoRA  # isort: skip

__all__ = [
    "SCHEME_VERSION",
    "Bias",
    "Full",
    "LastLayer",
    "LiteResidual",
    "LoRA",
    "Scheme",
    "Sparse",
    "list_schemes",
    "register_scheme",
    "resolve_scheme",
]
