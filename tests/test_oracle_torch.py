"""Derivatives against an independent AD system (PyTorch autograd), in float64.

Needs the optional extra: pip install '.[oracle]' (CI installs it in a second step).
"""

import numpy as np
import pytest

import adsvc as ad

torch = pytest.importorskip("torch", reason="optional oracle extra not installed: "
                            "pip install '.[oracle]'")

RNG = np.random.default_rng(5)


def mlp_ad(x, w1, b1, w2, y):
    h = ad.tanh(x @ w1 + b1)
    logits = h @ w2
    return -ad.mean(ad.sum(y * ad.log_softmax(logits, -1), -1))


def mlp_torch(x, w1, b1, w2, y):
    h = torch.tanh(x @ w1 + b1)
    return -(y * torch.log_softmax(h @ w2, -1)).sum(-1).mean()


def misc_ad(a, b):
    return ad.sum(ad.sqrt(1.0 + a * a) * ad.sigmoid(b) + ad.softplus(a - b)
                  + ad.maximum(a, 0.3) * ad.logsumexp(ad.reshape(b, (2, 3)), 1)[0]
                  + ad.pow(1.5 + ad.sin(a), ad.tanh(b)))


def misc_torch(a, b):
    return (torch.sqrt(1 + a * a) * torch.sigmoid(b) + torch.nn.functional.softplus(a - b)
            + torch.maximum(a, torch.tensor(0.3, dtype=a.dtype))
            * torch.logsumexp(b.reshape(2, 3), 1)[0]
            + (1.5 + torch.sin(a)) ** torch.tanh(b)).sum()


def gather_ad(x, i):
    t = ad.take(x, i, 0)
    return ad.sum(ad.square(t[:, 1:]) @ ad.transpose(x[:2, :2])) + ad.sum(ad.concat([x, t], 0))


def gather_torch(x, i):
    t = x[i]
    return (torch.square(t[:, 1:]) @ x[:2, :2].T).sum() + torch.cat([x, t], 0).sum()


CASES = {
    "mlp": (mlp_ad, mlp_torch, {"x": RNG.standard_normal((4, 5)),
                                "w1": RNG.standard_normal((5, 6)),
                                "b1": RNG.standard_normal(6),
                                "w2": RNG.standard_normal((6, 3)),
                                "y": np.eye(3)[[0, 2, 1, 1]]}),
    "misc": (misc_ad, misc_torch, {"a": RNG.standard_normal(6), "b": RNG.standard_normal(6)}),
    "gather": (gather_ad, gather_torch, {"x": RNG.standard_normal((5, 3)),
                                         "i": np.array([4, 0, 4, 2])}),
}


def _torch_inputs(feeds):
    return {k: torch.tensor(v, requires_grad=v.dtype.kind == "f") for k, v in feeds.items()}


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("mode", ["reverse", "forward"])
def test_gradient_matches_torch(name, mode):
    f_ad, f_t, feeds = CASES[name]
    g = ad.trace(f_ad, **{k: ad.Spec(v.dtype.name, v.shape) for k, v in feeds.items()})
    value, grad = ad.local().value_and_grad(g, mode=mode, inputs=feeds)
    ti = _torch_inputs(feeds)
    out = f_t(**ti)
    out.backward()
    assert value == pytest.approx(out.item(), rel=1e-13)
    for k, t in ti.items():
        if t.requires_grad:
            np.testing.assert_allclose(grad[k], t.grad.numpy(), rtol=1e-11, atol=1e-13)


@pytest.mark.parametrize("name", sorted(CASES))
def test_hessian_matches_torch(name):
    f_ad, f_t, feeds = CASES[name]
    floats = [k for k, v in feeds.items() if v.dtype.kind == "f"]
    g = ad.trace(f_ad, **{k: ad.Spec(v.dtype.name, v.shape) for k, v in feeds.items()})
    h = ad.local().hessian(g, inputs=feeds)
    fixed = {k: torch.tensor(v) for k, v in feeds.items() if k not in floats}
    th = torch.autograd.functional.hessian(
        lambda *xs: f_t(**dict(zip(floats, xs)), **fixed),
        tuple(torch.tensor(feeds[k]) for k in floats))
    for i, a in enumerate(floats):
        for j, b in enumerate(floats):
            np.testing.assert_allclose(h[a][b], th[i][j].numpy(), rtol=1e-10, atol=1e-12)
