"""Bad arguments fail early with a one-line ValueError that names the argument."""

import jax
import numpy as np
import pytest

import jaxsens as js
from jaxsens import noise

KEY = jax.random.key(0)
LAW = noise.RelativeNorm(0.1)


def _x(shape=(3, 6)):
    return np.random.default_rng(0).standard_normal(shape)


def _nonfinite(value):
    x = _x()
    x[1, 2] = value
    return x


# (id, call(model) -> anything, pattern the message must match)
CASES = [
    # unknown site, for every estimator
    ("site-sampled", lambda m: js.sampled(m, _x(), site="h9", noise=LAW, key=KEY), "site='h9'"),
    ("site-linearized", lambda m: js.linearized(m, _x(), site="h9", noise=LAW), "site='h9'"),
    ("site-bound", lambda m: js.bound(m, _x(), site="layers/9/kernel", noise=LAW), "site="),
    ("site-profile", lambda m: js.profile(m, _x(), noise=LAW, levels=[0.1], key=KEY,
                                          sites=["nope"]), "site='nope'"),
    # noise levels
    ("eps-negative", lambda m: noise.RelativeNorm(-0.1), "level"),
    ("eps-nan", lambda m: noise.RelativeNorm(float("nan")), "level"),
    ("eps-inf", lambda m: noise.WeightRelative(float("inf")), "level"),
    ("eps-string", lambda m: noise.Multiplicative("0.1"), "level"),
    ("sigma-negative", lambda m: noise.Absolute(-1.0), "sigma"),
    ("eps-bool", lambda m: noise.RelativeNorm(True), "level"),
    ("levels-negative", lambda m: js.profile(m, _x(), noise=LAW, levels=[0.1, -0.2], key=KEY),
     "levels"),
    ("levels-nan", lambda m: js.profile(m, _x(), noise=LAW, levels=[float("nan")], key=KEY),
     "levels"),
    ("levels-string", lambda m: js.profile(m, _x(), noise=LAW, levels=["a"], key=KEY),
     "levels"),
    ("levels-scalar", lambda m: js.profile(m, _x(), noise=LAW, levels=0.1, key=KEY), "levels"),
    ("reading", lambda m: noise.RelativeNorm(0.1, reading="uniform"), "reading"),
    ("weight-norm", lambda m: noise.WeightRelative(0.1, norm="nuclear"), "norm"),
    # inputs
    ("x-shape", lambda m: js.sampled(m, _x((3, 7)), site="h0", noise=LAW, key=KEY),
     r"x has per-example shape \(7,\)"),
    ("x-no-batch", lambda m: js.linearized(m, _x((6,)), site="h0", noise=LAW), "x "),
    ("x-empty-batch", lambda m: js.linearized(m, _x((0, 6)), site="h0", noise=LAW), "x must"),
    ("x-not-array", lambda m: js.bound(m, [[0.0] * 6], site="h0", noise=LAW), "x must"),
    ("x-nan", lambda m: js.sampled(m, _nonfinite(np.nan), site="h0", noise=LAW, key=KEY),
     "x contains NaN"),
    ("x-inf", lambda m: js.linearized(m, _nonfinite(np.inf), site="h0", noise=LAW),
     "x contains NaN or infinite"),
    # covariance size and shape
    ("cov-size-sampled", lambda m: js.sampled(m, _x(), site="input", key=KEY,
                                              noise=noise.FullCovariance(np.eye(3))), "cov"),
    ("cov-size-linearized", lambda m: js.linearized(m, _x(), site="input",
                                                    noise=noise.FullCovariance(np.eye(3))),
     "cov"),
    ("cov-size-bound", lambda m: js.bound(m, _x(), site="input",
                                          noise=noise.FullCovariance(np.eye(3))), "cov"),
    ("cov-not-square", lambda m: noise.FullCovariance(np.ones((3, 4))), "cov"),
    # law at a site kind it does not apply to, and not a law at all
    ("weight-law-at-activation", lambda m: js.linearized(
        m, _x(), site="h0", noise=noise.WeightRelative(0.1)), "noise WeightRelative"),
    ("full-covariance-at-weight", lambda m: js.sampled(
        m, _x(), site="layers/0/kernel", key=KEY, noise=noise.FullCovariance(np.eye(6))),
     "noise FullCovariance"),
    ("noise-not-a-law", lambda m: js.bound(m, _x(), site="h0", noise=0.1), "noise must"),
    # Monte Carlo arguments
    ("num-samples-zero", lambda m: js.sampled(m, _x(), site="h0", noise=LAW, key=KEY,
                                              num_samples=0), "num_samples"),
    ("num-samples-one", lambda m: js.sampled(m, _x(), site="h0", noise=LAW, key=KEY,
                                             num_samples=1), "num_samples"),
    ("num-samples-float", lambda m: js.sampled(m, _x(), site="h0", noise=LAW, key=KEY,
                                               num_samples=10.5), "num_samples"),
    ("num-samples-bool", lambda m: js.sampled(m, _x(), site="h0", noise=LAW, key=KEY,
                                              num_samples=True), "num_samples"),
    ("num-samples-profile", lambda m: js.profile(m, _x(), noise=LAW, levels=[0.1], key=KEY,
                                                 num_samples=-3), "num_samples"),
    ("chunk-size", lambda m: js.sampled(m, _x(), site="h0", noise=LAW, key=KEY,
                                        chunk_size=0), "chunk_size"),
    ("quantiles", lambda m: js.sampled(m, _x(), site="h0", noise=LAW, key=KEY,
                                       quantiles=(0.5, 1.5)), "quantiles"),
    ("quantiles-linearized", lambda m: js.linearized(m, _x(), site="h0", noise=LAW,
                                                     quantiles=(-0.1,)), "quantiles"),
    ("quantiles-bound-text", lambda m: js.bound(m, _x(), site="h0", noise=LAW,
                                                quantiles=("median",)), "quantiles"),
    ("key", lambda m: js.sampled(m, _x(), site="h0", noise=LAW, key=0), "key"),
    ("labels-float", lambda m: js.sampled(m, _x(), site="h0", noise=LAW, key=KEY,
                                          labels=np.zeros(3)), "labels"),
    ("labels-shape", lambda m: js.sampled(m, _x(), site="h0", noise=LAW, key=KEY,
                                          labels=np.zeros((3, 1), np.int32)), "labels"),
    ("labels-batch", lambda m: js.sampled(m, _x(), site="h0", noise=LAW, key=KEY,
                                          labels=np.zeros(4, np.int32)), "labels"),
    # other arguments
    ("estimators", lambda m: js.profile(m, _x(), noise=LAW, levels=[0.1], key=KEY,
                                        estimators=("exact",)), "estimators"),
    ("weight-sites-without-law", lambda m: js.profile(
        m, _x(), noise=LAW, levels=[0.1], key=KEY, weight_sites=["layers/0/kernel"]),
     "weight_noise"),
    ("model", lambda m: js.linearized(lambda x: x, _x(), site="h0", noise=LAW), "model"),
    ("unhashable-attribute", lambda m: (setattr(m.layers[0], "notes", ["a"]), js.linearized(
        m, _x(), site="h0", noise=LAW)), "layers.0.notes .list. is not hashable"),
    ("activation", lambda m: js.models.MLP(6, [8], 2, activation="swish",
                                           rngs=None), "activation"),
]


@pytest.mark.parametrize("call, pattern", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_argument_raises_one_line_value_error(x64, make_mlp, call, pattern):
    model = make_mlp(6, [16, 12], 4)
    with pytest.raises(ValueError, match=pattern) as err:
        call(model)
    message = str(err.value)
    assert "\n" not in message and len(message) > 20
