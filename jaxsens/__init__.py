"""jaxsens: differentiable sensitivity analysis of neural networks in JAX.

When noise enters a network (input, hidden activation or weight), how far does the
output move? Answered three ways on the same inputs: ``sampled`` (Monte Carlo),
``linearized`` (exact first-order propagation) and ``bound`` (certified worst case).
"""

from . import bounds as bounds
from . import estimators as estimators
from . import graph as graph
from . import losses as losses
from . import models as models
from . import moments as moments
from . import nin as nin
from . import noise as noise
from . import precision as precision
from . import sites as sites
from . import train as train
from .estimators import ESTIMATORS as ESTIMATORS
from .estimators import REGISTRY as REGISTRY
from .estimators import Deviation as Deviation
from .estimators import Profile as Profile
from .estimators import attack as attack
from .estimators import bound as bound
from .estimators import linearized as linearized
from .estimators import profile as profile
from .estimators import sampled as sampled
from .sites import PureModel as PureModel
from .sites import activation_sites as activation_sites
from .sites import activations as activations
from .sites import split as split
from .sites import weight_sites as weight_sites

# The analytic-moments estimator; ``jaxsens.moments`` is the module of closed forms.
propagate_moments = estimators.moments

__version__ = "0.1.0"
