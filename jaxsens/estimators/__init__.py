"""Estimators of the output deviation: one call shape, one result type, one registry.

Every estimator is ``estimator(model, x, *, site, noise, key=None, **options) ->
Deviation`` (:class:`Estimator`), compiled end to end: a call on a model seen before
does no tracing and no host synchronisation. :data:`REGISTRY` maps names to them;
:func:`profile` runs any subset over many sites and levels.
"""

from ..quadrature import gaussian_norm_mean as gaussian_norm_mean
from ._attack import attack as attack
from ._bound import bound as bound
from ._common import check_inputs as check_inputs
from ._deviation import DEFAULT_QUANTILES as DEFAULT_QUANTILES
from ._deviation import Deviation as Deviation
from ._linearized import linear_predictions as linear_predictions
from ._linearized import linearized as linearized
from ._linearized import sandwiches as sandwiches
from ._moments import moments as moments
from ._profile import Profile as Profile
from ._profile import profile as profile
from ._registry import DEFAULT_ESTIMATORS as DEFAULT_ESTIMATORS
from ._registry import ESTIMATORS as ESTIMATORS
from ._registry import REGISTRY as REGISTRY
from ._registry import Estimator as Estimator
from ._registry import EstimatorSpec as EstimatorSpec
from ._sampled import sampled as sampled
