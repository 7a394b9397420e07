"""train.jobs.batches.BatchPrefetch: micro-batches made one ahead on a side stream are the ones made on
the spot (CPU: nothing is made ahead; GPU, marked gpu: the same tensors, in the order asked, and a
request out of order is made fresh); train.pipeline.transfer's copies give the same tensors."""
import pytest
import torch

from adapterkit.train.jobs.batches import BatchPrefetch
from adapterkit.train.pipeline.transfer import stack_to_device, to_device


def make_on(device):
    made = []

    def make(step, micro):
        made.append((step, micro))
        g = torch.Generator(device).manual_seed(1000 * step + micro)
        noise = torch.randn(4, 8, generator=g, device=device)
        host = torch.full((4, 8), float(step * 10 + micro))
        return noise, to_device(host, device) + noise
    return make, made


def test_off_cuda_nothing_is_made_ahead():
    make, made = make_on("cpu")
    batches = BatchPrefetch(make, accum=2, steps=3, device=torch.device("cpu"))
    a = batches.get(0, 0)
    batches.prefetch(0, 0)
    assert made == [(0, 0)]
    b = batches.get(0, 1)
    assert made == [(0, 0), (0, 1)]
    fresh = make(0, 1)
    assert all(torch.equal(x, y) for x, y in zip(b, fresh)) and not torch.equal(a[1], b[1])


def test_transfers_off_cuda_are_plain_copies():
    tensors = [torch.randn(3, 2) for _ in range(4)]
    assert torch.equal(stack_to_device(tensors, "cpu"), torch.stack(tensors))
    assert to_device(tensors[0], "cpu") is tensors[0]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_made_ahead_on_the_side_stream_equals_made_on_the_spot():
    cuda = torch.device("cuda")
    make, made = make_on(cuda)
    batches = BatchPrefetch(make, accum=2, steps=3, device=cuda)
    got = []
    for step in range(3):
        for micro in range(2):
            b = batches.get(step, micro)
            got.append(tuple(t.clone() for t in b))
            torch.cuda._sleep(1_000_000)                  # the "step" keeps the GPU busy meanwhile
            batches.prefetch(step, micro)
    assert made == [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1)]      # nothing past the last step
    fresh_make, _ = make_on(cuda)
    for (step, micro), b in zip(made, got):
        assert all(torch.equal(x, y) for x, y in zip(b, fresh_make(step, micro)))
    batches.prefetch(0, 0)                                 # (0, 1) made ahead, then (1, 0) asked for
    assert torch.equal(batches.get(1, 0)[1], fresh_make(1, 0)[1])
    tensors = [torch.randn(3, 2) for _ in range(4)]
    assert torch.equal(stack_to_device(tensors, cuda).cpu(), torch.stack(tensors))
