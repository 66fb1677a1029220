"""Shared fixtures of the core-engine tests.

Exactness checks run in float64 through ``jax.enable_x64`` as a context manager (never a
global flag flipped mid-suite); models and data are created inside the context.

Test models get their parameters from NumPy (kernels N(0, 1/fan_in), biases N(0, 0.1²),
so biases are non-zero): eager Flax initialisation compiles one XLA program per parameter
shape, which would dominate the suite's run time on a small CPU machine.
"""

import gc
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxsens as js

# The suite compiles many small programs and runs each a few times: its time is XLA
# compilation. LLVM optimisation does not change results (no fast-math on CPU) but makes
# compiles ~4× slower, so switch it off. XLA reads the flags when JAX creates its CPU
# backend, at the first computation, i.e. after this module is imported. A user's own
# XLA_FLAGS win.
os.environ.setdefault(
    "XLA_FLAGS", "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true")
# The CLI's persistent compilation cache stays off in tests (no writes to the home
# directory); test_compile_cache.py turns it on in subprocesses of its own.
os.environ["JAXSENS_COMPILE_CACHE"] = "off"


@pytest.fixture(autouse=True, scope="module")
def _bounded_compilation_caches():
    """Drop JAX's in-process caches of compiled programs after each test module.

    One process runs the whole suite; kept forever, the executables of ~650 tests pile
    up (programs rarely repeat across modules), and a long run once died inside an XLA
    compilation. Clearing per module bounds that state at little cost.
    """
    yield
    jax.clear_caches()
    gc.collect()


@pytest.fixture
def x64():
    """Run the test body with 64-bit JAX types enabled."""
    with jax.enable_x64(True):
        yield


def numpy_init(make, seed):
    """Build ``make()`` abstractly and fill its parameters from a seeded NumPy generator."""
    graphdef, state = nnx.split(nnx.eval_shape(make))
    rng = np.random.default_rng(seed)

    def draw(leaf):
        shape, dtype = leaf.shape, leaf.dtype
        scale = 0.1 if len(shape) == 1 else 1.0 / np.sqrt(np.prod(shape[:-1]))
        return jnp.asarray(rng.standard_normal(shape) * scale, dtype)

    return nnx.merge(graphdef, jax.tree.map(draw, state))


@pytest.fixture
def init_from_numpy():
    """:func:`numpy_init` for any module: ``init_from_numpy(lambda: Module(...), seed)``."""
    return numpy_init


@pytest.fixture
def make_mlp():
    """``make_mlp(din, widths, dout, activation=..., seed=...)``: an MLP, float64 params.

    Call it inside the ``x64`` fixture (or another ``enable_x64`` context).
    """

    def make(din, widths, dout, *, activation="relu", seed=0, dtype=jnp.float64):
        return numpy_init(lambda: js.models.MLP(din, widths, dout, activation=activation,
                                                param_dtype=dtype, rngs=nnx.Rngs(0)), seed)

    return make


@pytest.fixture
def make_lenet():
    """``make_lenet(activation=..., seed=...)``: a small LeNet on 16×16×1 inputs, 5 classes."""

    def make(*, activation="relu", seed=0, dtype=jnp.float64):
        return numpy_init(lambda: js.models.LeNet(
            (16, 16, 1), 5, channels=(3, 4), hidden=(24, 12), kernel_size=3,
            activation=activation, param_dtype=dtype, rngs=nnx.Rngs(0)), seed)

    return make
