"""Analytic moments of ReLU networks under Gaussian input (DESIGN section 3.4)."""

from ._gaussian import GaussianMoments as GaussianMoments
from ._gaussian import affine_relu_affine as affine_relu_affine
from ._gaussian import affine_relu_affine_zero_mean_cov as affine_relu_affine_zero_mean_cov
from ._gaussian import bivariate_normal_cdf as bivariate_normal_cdf
from ._gaussian import owens_t as owens_t
from ._gaussian import relu_cross_moment as relu_cross_moment
from ._gaussian import relu_cross_moment_zero_mean as relu_cross_moment_zero_mean
from ._gaussian import relu_mean as relu_mean
from ._gaussian import relu_moments as relu_moments
from ._gaussian import relu_second_moment as relu_second_moment
from ._network import METHODS as METHODS
from ._network import TwoStage as TwoStage
from ._network import layerwise_moments as layerwise_moments
from ._network import noncentral_norm_mean as noncentral_norm_mean
from ._network import output_moments as output_moments
from ._network import split_sites as split_sites
from ._network import two_stage_linearization as two_stage_linearization
from ._network import two_stage_moments as two_stage_moments
from ._tightness import symmetric_relative_error as symmetric_relative_error
from ._tightness import tightness_study as tightness_study
