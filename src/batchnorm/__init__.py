"""batchnorm — batch normalization (Ioffe & Szegedy 2015, arXiv 1502.03167): an exact NumPy
reference, a torch functional core with fused CPU kernels, drop-in modules, the tools real
projects need, and a lab that tests the claims made about BN.

Import is light: the Numba kernels compile lazily on first use, and the lab is imported only
through ``batchnorm.lab``.
"""

from batchnorm import functional, reference
from batchnorm.analysis import (
    TimeVaryingNoise,
    activation_statistics,
    bn_statistics_mismatch,
    distribution_drift,
    internal_covariate_shift,
    loss_landscape,
)
from batchnorm.convert import ConversionReport, convert_model, keras_to_torch, torch_to_keras
from batchnorm.diagnostics import (
    DoctorReport,
    Finding,
    LayerGap,
    OutputGap,
    doctor,
    output_gap,
    stat_gaps,
)
from batchnorm.functional import (
    BatchNormInputError,
    NonFiniteStatisticsError,
    NonFiniteStatisticsWarning,
    batch_norm,
)
from batchnorm.inplace_abn import InPlaceABN, InPlaceABNPrecisionWarning
from batchnorm.native import output_cache_budget, release_output_caches, set_output_cache_budget
from batchnorm.nn import BatchNorm, BatchNorm1d, BatchNorm2d, BatchNorm3d
from batchnorm.nn.batchnorm import SmallBatchWarning
from batchnorm.recorder import ActivationRecorder
from batchnorm.sync import SyncBatchNorm, SyncBatchNormError, convert_sync_batchnorm
from batchnorm.tools import fold, recalibrate, safe_globals, to_inference
from batchnorm.variants import (
    BatchRenorm,
    BatchRenorm1d,
    BatchRenorm2d,
    BatchRenorm3d,
    FrozenBatchNorm,
    FrozenBatchNorm1d,
    FrozenBatchNorm2d,
    FrozenBatchNorm3d,
    FrozenStatisticsWarning,
    GhostBatchNorm,
    GhostBatchNorm1d,
    GhostBatchNorm2d,
    GhostBatchNorm3d,
    freeze,
    unfreeze,
)

__version__ = "0.1.0"

# public API — each feature adds its names here
__all__ = [
    "ActivationRecorder",
    "functional",
    "reference",
    "batch_norm",
    "BatchNorm",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "BatchNormInputError",
    "NonFiniteStatisticsError",
    "NonFiniteStatisticsWarning",
    "convert_model",
    "keras_to_torch",
    "torch_to_keras",
    "ConversionReport",
    "internal_covariate_shift",
    "loss_landscape",
    "activation_statistics",
    "distribution_drift",
    "bn_statistics_mismatch",
    "TimeVaryingNoise",
    "SyncBatchNorm",
    "convert_sync_batchnorm",
    "BatchRenorm",
    "BatchRenorm1d",
    "BatchRenorm2d",
    "BatchRenorm3d",
    "GhostBatchNorm",
    "GhostBatchNorm1d",
    "GhostBatchNorm2d",
    "GhostBatchNorm3d",
    "FrozenBatchNorm",
    "FrozenBatchNorm1d",
    "FrozenBatchNorm2d",
    "FrozenBatchNorm3d",
    "freeze",
    "unfreeze",
    "recalibrate",
    "fold",
    "to_inference",
    "safe_globals",
    "release_output_caches",
    "set_output_cache_budget",
    "output_cache_budget",
    "InPlaceABN",
    "InPlaceABNPrecisionWarning",
    "SmallBatchWarning",
    "FrozenStatisticsWarning",
    "SyncBatchNormError",
    "doctor",
    "DoctorReport",
    "Finding",
    "LayerGap",
    "OutputGap",
    "stat_gaps",
    "output_gap",
]
