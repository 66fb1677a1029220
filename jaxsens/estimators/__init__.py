"""Estimators of the output deviation: sampled, linearized, bound (and profile)."""

from ._core import ESTIMATORS as ESTIMATORS
from ._core import bound as bound
from ._core import check_inputs as check_inputs
from ._core import linearized as linearized
from ._core import moments as moments
from ._core import profile as profile
from ._core import sampled as sampled
from ._gauss import gaussian_norm_mean as gaussian_norm_mean
from ._result import Deviation as Deviation
