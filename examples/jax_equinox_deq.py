"""A DEQ classifier as an Equinox module, trained with optax under ``jit``.

Digits (scikit-learn's bundled copy) -> linear encoder -> implicit layer
``z* = tanh(W z* + x_enc)`` -> linear head. The implicit layer captures the module's weights in
a closure: implicit-core closure-converts it, so ``W`` receives its implicit gradient like an
explicit argument would.

    python examples/jax_equinox_deq.py        # IMPLICIT_CORE_THREADS=N sets XLA's CPU threads
"""

from __future__ import annotations

from implicit_demo.threads import default_threads, limit_threads

# Before JAX is imported: XLA reads its thread settings once. More threads than free cores make
# this small model many times slower.
limit_threads(default_threads())

import equinox as eqx  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import implicit_core as ic  # noqa: E402


class DEQClassifier(eqx.Module):
    encoder: eqx.nn.Linear
    W: jax.Array
    head: eqx.nn.Linear
    solver: str = eqx.field(static=True, default="anderson")
    gradient: str = eqx.field(static=True, default="ift")

    def __init__(self, n_in: int, hidden: int, n_out: int, key: jax.Array, **static):
        k1, k2, k3 = jax.random.split(key, 3)
        self.encoder = eqx.nn.Linear(n_in, hidden, key=k1)
        W = jax.random.normal(k2, (hidden, hidden)) / jnp.sqrt(hidden)
        self.W = 0.5 * W / jnp.linalg.norm(W, 2)  # start well inside the contractive regime
        self.head = eqx.nn.Linear(hidden, n_out, key=k3)
        for name, value in static.items():
            setattr(self, name, value)

    def __call__(self, x: jax.Array) -> tuple[jax.Array, ic.SolveInfo]:
        inj = jax.vmap(self.encoder)(x)
        z, info = ic.fixed_point(lambda z, inj: jnp.tanh(z @ self.W.T + inj), jnp.zeros_like(inj), inj,
                                 solver=self.solver, gradient=self.gradient, tol=1e-4, max_iter=40,
                                 on_fail="ignore")
        return jax.vmap(self.head)(z), info


def load_digits_split(seed: int = 0):
    from sklearn.datasets import load_digits

    data = load_digits()
    X = (data.data / 16.0).astype(np.float32)
    y = data.target
    order = np.random.default_rng(seed).permutation(len(X))
    X, y = X[order], y[order]
    cut = int(0.8 * len(X))
    return (jnp.asarray(X[:cut]), jnp.asarray(y[:cut])), (jnp.asarray(X[cut:]), jnp.asarray(y[cut:]))


def main(steps: int = 300, batch: int = 128, hidden: int = 64, seed: int = 0, gradient: str = "ift", verbose=True):
    (X, y), (X_test, y_test) = load_digits_split(seed)
    model = DEQClassifier(X.shape[1], hidden, 10, jax.random.key(seed), gradient=gradient)
    optimiser = optax.adam(3e-3)
    opt_state = optimiser.init(eqx.filter(model, eqx.is_array))

    def loss_fn(model, xb, yb):
        logits, info = model(xb)
        return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean(), info

    @eqx.filter_jit
    def step(model, opt_state, xb, yb):
        (loss, info), grads = eqx.filter_value_and_grad(loss_fn, has_aux=True)(model, xb, yb)
        updates, opt_state = optimiser.update(grads, opt_state, model)
        return eqx.apply_updates(model, updates), opt_state, loss, info.steps.mean()

    @eqx.filter_jit
    def accuracy(model, xb, yb):
        logits, _ = model(xb)
        return (logits.argmax(-1) == yb).mean()

    rng = np.random.default_rng(seed)
    for i in range(steps):
        idx = rng.choice(len(X), batch, replace=False)
        model, opt_state, loss, mean_steps = step(model, opt_state, X[idx], y[idx])
        if verbose and (i % 50 == 0 or i == steps - 1):
            print(f"step {i:4d}  loss {float(loss):.3f}  solver steps {float(mean_steps):.1f}")
    acc = float(accuracy(model, X_test, y_test))
    if verbose:
        print(f"test accuracy {acc:.3f}")
    return acc


if __name__ == "__main__":
    main()
