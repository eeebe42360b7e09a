"""ondevice: on-device continual learning with sparse updates that really save memory.

The entry points::

    import ondevice
    model = ondevice.pretrain("cnn")                    # a zoo backbone pretrained on shipped digits
    model.replace_head(5)
    prepared = ondevice.prepare(model, "lite_residual") # freeze, attach branches, memory-saving ops
    trainer = ondevice.Trainer(prepared, optimizer="adam")
    trainer.fit(data, epochs=5)
    prepared.save_delta("delta.safetensors")            # only what trains
    prepared.save_backbone("backbone.safetensors")      # what does not (int8 + scales if so prepared)

``import ondevice`` never imports Flower, pyserial or asyncssh.
"""

from ondevice._version import __version__
from ondevice.backbone import load_backbone, save_backbone
from ondevice.continual import (
    ClassBalancedBuffer,
    ContinualMetrics,
    Learner,
    LearnerConfig,
    ReservoirBuffer,
    create_learner,
)
from ondevice.data import Stream, TensorData, as_stream, load_digits
from ondevice.errors import (
    BudgetExceededError,
    CheckpointError,
    CheckpointMismatchError,
    ConfigError,
    InputDtypeError,
    InputShapeError,
    NonFiniteBatchError,
    OnDeviceError,
    StockAutogradWarning,
    UnknownModelError,
    UnknownSchemeError,
    UnsupportedModuleError,
)
from ondevice.models import ClassifierModel, create_model, list_models, register_model
from ondevice.optim import OptimizerConfig
from ondevice.prepared import PreparedModel, PrepareReport, StockLayer, prepare
from ondevice.pretrain import pretrain, pretrain_with_report
from ondevice.schemes import (
    Bias,
    Full,
    LastLayer,
    LiteResidual,
    LoRA,
    Scheme,
    Sparse,
    list_schemes,
    resolve_scheme,
)
from ondevice.trainer import EvalResult, FitResult, Trainer, evaluate

__all__ = [
    "Bias",
    "BudgetExceededError",
    "CheckpointError",
    "CheckpointMismatchError",
    "ClassBalancedBuffer",
    "ClassifierModel",
    "ConfigError",
    "ContinualMetrics",
    "EvalResult",
    "FitResult",
    "Full",
    "InputDtypeError",
    "InputShapeError",
    "LastLayer",
    "Learner",
    "LearnerConfig",
    "LiteResidual",
    "LoRA",
    "NonFiniteBatchError",
    "OnDeviceError",
    "OptimizerConfig",
    "PrepareReport",
    "PreparedModel",
    "ReservoirBuffer",
    "Scheme",
    "Sparse",
    "StockAutogradWarning",
    "StockLayer",
    "Stream",
    "TensorData",
    "Trainer",
    "UnknownModelError",
    "UnknownSchemeError",
    "UnsupportedModuleError",
    "__version__",
    "as_stream",
    "create_learner",
    "create_model",
    "evaluate",
    "list_models",
    "list_schemes",
    "load_backbone",
    "load_digits",
    "prepare",
    "pretrain",
    "pretrain_with_report",
    "register_model",
    "resolve_scheme",
    "save_backbone",
]
