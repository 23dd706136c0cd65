"""sam_optax: sharpness-aware minimization as Optax gradient transformations."""

from sam_optax import ascent
from sam_optax import descent
from sam_optax import linen
from sam_optax import masks
from sam_optax import nnx
from sam_optax import parallel
from sam_optax import schedule
from sam_optax import sharpness
from sam_optax.core import Ascent
from sam_optax.core import Descent
from sam_optax.core import SAMDiagnostics
from sam_optax.core import SAMState
from sam_optax.core import Schedule
from sam_optax.core import diagnostics
from sam_optax.core import sharpness_aware
from sam_optax.momentum_sam import msam_clean_params
from sam_optax.momentum_sam import msam_perturbed_params
from sam_optax.schedule import gsam_rho_schedule
from sam_optax.variants import ae_sam
from sam_optax.variants import asam
from sam_optax.variants import esam
from sam_optax.variants import every_k_sam
from sam_optax.variants import fisher_sam
from sam_optax.variants import friendly_sam
from sam_optax.variants import gsam
from sam_optax.variants import looksam
from sam_optax.variants import msam
from sam_optax.variants import multistep_sam
from sam_optax.variants import random_sam
from sam_optax.variants import sam
from sam_optax.variants import vasso
from sam_optax.variants import wsam

__version__ = "0.1.0"

__all__ = [
    "Ascent",
    "Descent",
    "SAMDiagnostics",
    "SAMState",
    "Schedule",
    "ae_sam",
    "asam",
    "ascent",
    "descent",
    "diagnostics",
    "esam",
    "every_k_sam",
    "fisher_sam",
    "friendly_sam",
    "gsam",
    "gsam_rho_schedule",
    "linen",
    "looksam",
    "masks",
    "msam",
    "msam_clean_params",
    "msam_perturbed_params",
    "multistep_sam",
    "nnx",
    "parallel",
    "random_sam",
    "sam",
    "schedule",
    "sharpness",
    "sharpness_aware",
    "vasso",
    "wsam",
]
