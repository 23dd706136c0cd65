"""sam_optax: sharpness-aware minimization as Optax gradient transformations."""

from sam_optax.core import Ascent
from sam_optax.core import Descent
from sam_optax.core import SAMDiagnostics
from sam_optax.core import SAMState
from sam_optax.core import Schedule
from sam_optax.core import diagnostics
from sam_optax.core import sharpness_aware
from sam_optax.variants import sam

__version__ = "0.1.0"

__all__ = [
    "Ascent",
    "Descent",
    "SAMDiagnostics",
    "SAMState",
    "Schedule",
    "diagnostics",
    "sam",
    "sharpness_aware",
]
