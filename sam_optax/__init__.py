"""sam_optax: sharpness-aware minimization as Optax gradient transformations."""

from sam_optax import ascent, descent, linen, masks, nnx, parallel, schedule, sharpness
from sam_optax.core import (
    Ascent,
    Descent,
    SAMDiagnostics,
    SAMState,
    Schedule,
    diagnostics,
    sharpness_aware,
)
from sam_optax.momentum_sam import (
    MomentumSAMState,
    msam_clean_params,
    msam_perturbed_params,
)
from sam_optax.schedule import gsam_rho_schedule
from sam_optax.variants import (
    ae_sam,
    asam,
    esam,
    every_k_sam,
    fisher_sam,
    friendly_sam,
    gcsam,
    gsam,
    looksam,
    msam,
    multistep_sam,
    random_sam,
    sam,
    vasso,
    wsam,
)

__version__ = "0.1.0"

__all__ = [
    "Ascent",
    "Descent",
    "MomentumSAMState",
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
    "gcsam",
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
