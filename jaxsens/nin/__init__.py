"""Noise Injection Nodes (Levi, Bloch, Freytsis, Volansky 2022): the layer, its training
dynamics and their phases, and NIN regularization.

* :mod:`._node`: :class:`NoiseInjection` (a trainable noise column θ in a dense or
  convolutional layer, pixel-wise for feature maps), the explicit-key
  :class:`DropoutNode`, :func:`attach` and :func:`attach_dropout`;
* :mod:`._dynamics`: :func:`train_dynamics` and :func:`sweep`, SGD training as one
  compiled ``lax.scan`` (vmapped over σ and seeds) recording ‖θ‖, its readout projection,
  the loss and the curvature along θ;
* :mod:`._phases`: decay-rate fits, phases, and the linear two-layer test problem.

The mechanism tested here is a reconstruction (DESIGN §3.6), not the paper's text.
"""

from ._dynamics import LOSSES as LOSSES
from ._dynamics import Dynamics as Dynamics
from ._dynamics import Schedule as Schedule
from ._dynamics import Trace as Trace
from ._dynamics import split_model as split_model
from ._dynamics import sweep as sweep
from ._dynamics import train_dynamics as train_dynamics
from ._dynamics import with_params as with_params
from ._node import DISTRIBUTIONS as DISTRIBUTIONS
from ._node import RESAMPLE as RESAMPLE
from ._node import DropoutNode as DropoutNode
from ._node import Node as Node
from ._node import NoiseInjection as NoiseInjection
from ._node import NoiseKeys as NoiseKeys
from ._node import NoiseScale as NoiseScale
from ._node import attach as attach
from ._node import attach_dropout as attach_dropout
from ._node import couple as couple
from ._node import example_keys as example_keys
from ._node import injection_layers as injection_layers
from ._node import nodes as nodes
from ._node import unit_noise as unit_noise
from ._phases import MEASURED_PHASES as MEASURED_PHASES
from ._phases import PHASES as PHASES
from ._phases import LinearProblem as LinearProblem
from ._phases import decay_window as decay_window
from ._phases import linear_problem as linear_problem
from ._phases import measured_decay_rate as measured_decay_rate
from ._phases import measured_phase as measured_phase
from ._phases import phase_findings as phase_findings
from ._phases import phase_table as phase_table
from ._phases import predicted_decay_rate as predicted_decay_rate
from ._phases import predicted_phase as predicted_phase
