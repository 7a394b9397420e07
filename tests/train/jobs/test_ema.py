"""train.ema: the average follows the weights with the warmed-up decay, swaps in and out exactly."""
import pytest
import torch

from adapterkit.train.jobs.ema import EMA


def _params():
    torch.manual_seed(0)
    return {"a": torch.nn.Parameter(torch.randn(4, 3)), "b": torch.nn.Parameter(torch.randn(5))}


def test_the_average_follows_the_warmed_up_decay():
    named = _params()
    start = {n: p.detach().clone() for n, p in named.items()}
    ema = EMA(named, decay=0.9)
    with torch.no_grad():
        for p in named.values():
            p.add_(1.0)
    ema.update(0)                                   # decay min(0.9, 1/10) = 0.1
    for n in named:
        torch.testing.assert_close(ema.state()["ema." + n], start[n] + 0.9, rtol=0, atol=1e-6)
    assert ema.decay_at(0) == pytest.approx(0.1) and ema.decay_at(10**6) == 0.9


def test_decay_zero_is_the_weights_and_applied_restores_them_exactly():
    named = _params()
    ema = EMA(named, decay=0.0)
    with torch.no_grad():
        named["a"].mul_(3)
    ema.update(100)
    live = {n: p.detach().clone() for n, p in named.items()}
    assert all(torch.equal(ema.state()["ema." + n], live[n]) for n in named)

    ema2 = EMA(named, decay=0.99)
    with torch.no_grad():
        named["b"].add_(5)
    ema2.update(1000)
    inside = {}
    with ema2.applied():
        inside = {n: p.detach().clone() for n, p in named.items()}
    assert not torch.equal(inside["b"], named["b"])               # the average was in place ...
    assert torch.equal(inside["b"], ema2.state()["ema.b"])
    assert torch.equal(named["b"], live["b"] + 5)                  # ... and the weights came back


def test_bad_decay_is_refused():
    with pytest.raises(ValueError, match="EMA decay"):
        EMA(_params(), decay=1.0)
