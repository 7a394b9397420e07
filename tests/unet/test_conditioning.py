"""The conditioning record: a U-Net and a ControlNet given a Conditioning compute what they compute
from its bare context, and its batch operations keep every field aligned row by row."""
import pytest
import torch

from adapterkit.adapters.controlnet import ControlNet
from adapterkit.unet import Conditioning, as_conditioning
from support.unets import TINY, inputs, random_unet


def test_a_record_and_its_bare_context_give_the_same_prediction():
    unet = random_unet()
    sample, t, context, hint = inputs()
    cond = Conditioning(context)
    assert torch.equal(unet(sample, t, cond), unet(sample, t, context))
    cn = ControlNet.from_unet(unet, hint_widths=(16, 32, 96, 256))
    with torch.no_grad():
        for conv in cn.zero_convs():
            conv.weight.normal_(std=0.1)
    a, b = cn(sample, t, cond, hint), cn(sample, t, context, hint)
    assert all(torch.equal(x, y) for x, y in zip(a.down, b.down)) and torch.equal(a.mid, b.mid)
    assert a.mid.abs().sum() > 0


def test_batch_operations_keep_the_fields_aligned():
    ctx = torch.arange(4.0)[:, None, None].expand(4, 3, TINY.context_dim)
    pooled = torch.arange(4.0)[:, None].expand(4, 5)
    ids = torch.arange(4)[:, None].expand(4, 6)
    cond = Conditioning(ctx, pooled=pooled, time_ids=ids)
    rows = cond[torch.tensor([3, 1])]
    assert rows.context[:, 0, 0].tolist() == rows.pooled[:, 0].tolist() == [3, 1]
    assert rows.time_ids[:, 0].tolist() == [3, 1]
    both = Conditioning.cat([cond[:2], cond[2:]])
    assert all(torch.equal(x, y) for x, y in zip(both.tensors().values(), cond.tensors().values()))
    assert both.repeat(2).pooled[:, 0].tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    half = cond.to(dtype=torch.float16)
    assert half.context.dtype == half.pooled.dtype == torch.float16 and half.time_ids.dtype == torch.int64
    assert cond.to("cpu", torch.float16).shapes == half.shapes == cond.shapes
    assert cond.to(torch.float64).pooled.dtype == torch.float64 and len(cond) == 4
    assert list(Conditioning(ctx).tensors()) == ["context"] and as_conditioning(cond) is cond
    with pytest.raises(ValueError, match="different fields"):
        Conditioning.cat([cond, Conditioning(ctx)])
