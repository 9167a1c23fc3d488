"""A DEQ layer in plain NumPy: solve, then differentiate with every gradient estimator.

    python examples/numpy_quickstart.py
"""

import numpy as np

import implicit_core as ic


def f(z, args):
    """z* = tanh(z W^T + x)"""
    W, x = args
    return np.tanh(z @ W.T + x)


def f_vjp(z, args, v):
    """(v^T df/dz, v^T df/d(W, x))"""
    W, x = args
    s = v * (1 - np.tanh(z @ W.T + x) ** 2)
    return s @ W, (s.T @ z, s)


def main(batch: int = 32, n: int = 64, seed: int = 0) -> dict[str, float]:
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((n, n))
    W *= 0.9 / np.linalg.norm(W, 2)
    x = rng.standard_normal((batch, n))
    z0 = np.zeros((batch, n))
    z, info = ic.fixed_point(f, z0, (W, x), solver="broyden", tol=1e-10, max_iter=100,
                             gradient=ic.get_gradient("ift", tol=1e-10), vjp=f_vjp)
    print(info.summary())
    g = np.ones_like(z)  # dL/dz* for L = sum(z*)
    exact = info.vjp(g)[0]
    cosines = {}
    for name in ("ift", "jfb", "phantom", "shine", "broyden_reuse"):
        _, info = ic.fixed_point(f, z0, (W, x), solver="broyden", gradient=name, tol=1e-6, vjp=f_vjp)
        dW = info.vjp(g)[0]
        cosines[name] = float(np.sum(dW * exact) / (np.linalg.norm(dW) * np.linalg.norm(exact)))
        print(f"{name:14s} cosine of dL/dW to the exact gradient: {cosines[name]:.4f}")
    return cosines


if __name__ == "__main__":
    main()
