"""Certified bounds beyond the Lipschitz estimator: weight-perturbation margins.

:func:`weight_margin_bound` bounds the change of every pairwise class margin under
norm-bounded (ℓ∞-operator) perturbations of chosen dense layers, jointly with an ℓ∞ input
ball (a sound form derived after Tsai et al., NeurIPS 2021 — not the paper's constants);
:func:`weight_attack` and :func:`random_weight_perturbation` are what it is held against;
:func:`generalization_term` is the Rademacher term of the perturbed class.
"""

from ._attack import accuracy_under_weight_noise as accuracy_under_weight_noise
from ._attack import project_l1_ball as project_l1_ball
from ._attack import random_weight_perturbation as random_weight_perturbation
from ._attack import weight_attack as weight_attack
from ._margin import FORMS as FORMS
from ._margin import MarginChain as MarginChain
from ._margin import certified_accuracy as certified_accuracy
from ._margin import certified_radius as certified_radius
from ._margin import generalization_term as generalization_term
from ._margin import layer_budgets as layer_budgets
from ._margin import loss_change_bound as loss_change_bound
from ._margin import margin_bound_and_logits as margin_bound_and_logits
from ._margin import margin_chain as margin_chain
from ._margin import output_linf_bound as output_linf_bound
from ._margin import weight_margin_bound as weight_margin_bound

__all__ = [
    "FORMS",
    "MarginChain",
    "accuracy_under_weight_noise",
    "certified_accuracy",
    "certified_radius",
    "generalization_term",
    "layer_budgets",
    "loss_change_bound",
    "margin_bound_and_logits",
    "margin_chain",
    "output_linf_bound",
    "project_l1_ball",
    "random_weight_perturbation",
    "weight_attack",
    "weight_margin_bound",
]
