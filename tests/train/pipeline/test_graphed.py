"""train.pipeline.graphed: the sampler's model call replayed from a CUDA graph. On the CPU the call
is the plain one (same tensors, nothing captured); on a GPU (marked gpu) graphed sampling gives the
eager sampling's latents, a ControlNet's hints being the graph's inputs, one capture per shape."""
import pytest
import torch

from adapterkit.train.pipeline.base import load_base
from adapterkit.train.pipeline.generate import generate
from adapterkit.train.pipeline.graphed import GraphedCall, flatten, layout_key, unflatten
from adapterkit.train.world.shapes import canny_map, sample_scenes
from adapterkit.unet import Conditioning
from support.unets import controlnet_for, inputs, random_unet

PROMPTS = ["a red circle on a blue background", "a white cross on a green background", ""]
KW = {"steps": 3, "guidance": 3.0}


def test_arguments_flatten_and_come_back_as_they_were():
    a, b, c = torch.ones(2, 3), torch.zeros(2, 4), torch.arange(2)
    args = (a, Conditioning(b, time_ids=c), [a, b], None)
    flat, spec = flatten(args)
    assert len(flat) == 5
    back = unflatten(flat, spec)
    assert back[0] is a and back[1].context is b and back[1].time_ids is c and back[1].pooled is None
    assert back[2][0] is a and back[2][1] is b and back[3] is None
    assert layout_key(*flatten((a.t(),))) != layout_key(*flatten((a.t().contiguous(),)))   # strides count


def test_on_the_cpu_the_call_is_the_plain_call():
    unet = random_unet().eval()
    x, t, ctx, _ = inputs()
    graphed = GraphedCall(unet)
    with torch.no_grad():
        assert torch.equal(graphed(x, t, Conditioning(ctx)), unet(x, t, Conditioning(ctx)))
    assert not graphed.graphs


def test_generate_with_graphs_on_the_cpu_is_exactly_the_eager_run(pixel_base_dir):
    base = load_base(pixel_base_dir)
    seeds = [0, 1, 2]
    assert torch.equal(generate(base, PROMPTS, seeds, batch_size=2, **KW),
                       generate(base, PROMPTS, seeds, batch_size=2, cuda_graphs=False, **KW))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_graphed_sampling_equals_eager_sampling_on_the_gpu(pixel_base_dir):
    from adapterkit.train.pipeline.graphed import channels_last
    base = load_base(pixel_base_dir, device="cuda")
    channels_last(base.unet.to(torch.bfloat16), "cuda")
    seeds = [0, 1, 2]
    eager = generate(base, PROMPTS, seeds, batch_size=2, cuda_graphs=False, **KW)
    graphed = generate(base, PROMPTS, seeds, batch_size=2, **KW)     # batches of 2 then 1: two captures
    torch.testing.assert_close(graphed, eager, atol=2e-2, rtol=0)   # bf16 noise at most
    # With a ControlNet: each batch's hints are inputs of the graph, not constants of the capture.
    cn = controlnet_for(base, zero=False).to("cuda", torch.bfloat16)
    hints = [canny_map(s, 16) for s in sample_scenes(3, 5)]
    eager = generate(base, PROMPTS, seeds, batch_size=1, controlnet=cn, hints=hints, cuda_graphs=False, **KW)
    graphed = generate(base, PROMPTS, seeds, batch_size=1, controlnet=cn, hints=hints, **KW)
    torch.testing.assert_close(graphed, eager, atol=2e-2, rtol=0)
    assert (eager[0] - eager[1]).abs().max() > 0.05          # the hints (and prompts) do differ per image


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_graphed_call_replays_one_capture_per_shape_with_new_inputs():
    unet = random_unet().to("cuda").eval()
    graphed = GraphedCall(unet)
    with torch.no_grad():
        for n, batch in enumerate((2, 2, 4, 2)):
            x, _, ctx, _ = (a.to("cuda") for a in inputs(batch=batch, seed=n))
            t = torch.randint(0, 1000, (batch,), device="cuda")
            torch.testing.assert_close(graphed(x, t, Conditioning(ctx)), unet(x, t, Conditioning(ctx)),
                                       atol=1e-4, rtol=1e-4)
    assert len(graphed.graphs) == 2
