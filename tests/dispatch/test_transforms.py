"""split_heads / pad_heads are exact on the op's reference (real attention semantics)."""

import pytest
import torch

from kernmux.dispatch.registry import REGISTRY
from kernmux.dispatch.transforms import apply_transform, transformed_head_counts
from kernmux.dispatch.rule_model import TransformSpec
from tests.dispatch.toy_ops import toy_attention


def _inputs(heads, sink, seed, batch=2):
    op = REGISTRY.op("toy_attention")
    feats = {**op.default_features(), "heads": heads, "sink": sink, "batch": batch}
    args, _ = op.make_inputs(feats, "cpu", seed)
    return op, args


@pytest.mark.parametrize("sink", [False, True])
@pytest.mark.parametrize("heads,chunk", [(64, 32), (7, 3), (16, 16), (5, 8), (48, 32)])
def test_split_heads_equals_reference(heads, chunk, sink):
    op, args = _inputs(heads, sink, seed=heads * 31 + chunk)
    calls = []

    def recording(*a):
        calls.append(a[0].shape[1])
        return toy_attention(*a)

    o, lse = apply_transform(recording, op, TransformSpec(split_heads=chunk))(*args)
    ro, rlse = toy_attention(*args)
    # Equal up to float rounding (BLAS may order sums differently per shape).
    assert torch.allclose(o, ro, rtol=0, atol=1e-6) and torch.allclose(lse, rlse, rtol=0, atol=1e-6)
    assert max(calls) <= chunk and sum(calls) == heads  # each chunk a complete call
    assert sorted(set(calls)) == transformed_head_counts(TransformSpec(split_heads=chunk), heads)


@pytest.mark.parametrize("sink", [False, True])
@pytest.mark.parametrize("heads,target", [(8, 16), (7, 16), (1, 16), (16, 16), (3, 4)])
def test_pad_heads_equals_reference(heads, target, sink):
    op, args = _inputs(heads, sink, seed=heads * 17 + target)
    seen = []

    def recording(*a):
        seen.append(a[0].shape[1])
        return toy_attention(*a)

    o, lse = apply_transform(recording, op, TransformSpec(pad_heads=target))(*args)
    ro, rlse = toy_attention(*args)
    assert o.shape == ro.shape and lse.shape == rlse.shape
    assert torch.allclose(o, ro, rtol=0, atol=1e-6) and torch.allclose(lse, rlse, rtol=0, atol=1e-6)
    assert seen == [max(heads, target)]


def test_split_then_pad_composes():
    op, args = _inputs(40, True, seed=5)
    seen = []

    def recording(*a):
        seen.append(a[0].shape[1])
        return toy_attention(*a)

    spec = TransformSpec(split_heads=32, pad_heads=16)
    o, lse = apply_transform(recording, op, spec)(*args)
    ro, rlse = toy_attention(*args)
    assert torch.allclose(o, ro, atol=1e-6) and torch.allclose(lse, rlse, atol=1e-6)
    assert seen == [32, 16]  # the 8-head remainder chunk was padded to 16
    assert transformed_head_counts(spec, 40) == [16, 32]


def test_transform_catches_wrong_output_join():
    """A kernel that mixes heads up would be caught: the check is not vacuous."""
    op, args = _inputs(8, False, seed=1)

    def swapped(*a):
        o, lse = toy_attention(*a)
        return o.flip(1), lse.flip(1)

    o, lse = apply_transform(swapped, op, TransformSpec(split_heads=4))(*args)
    ro, _ = toy_attention(*args)
    assert not torch.allclose(o, ro)


def test_weighted_head_sum_zero_padding():
    """Ops that sum over heads pad with zeros and add split chunks."""
    from kernmux.dispatch.registry import HeadAxes, Op, Roofline
    from kernmux.dispatch.transforms import pad_heads, split_heads

    def head_sum(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return (torch.relu(x) * w[:, :, None]).sum(1)

    op = Op(
        name="toy_headsum", doc="", reference=head_sum, feature_specs=(), features=lambda x, w: {},
        validate=lambda x, w: None, make_inputs=None, compare=None, fake=None, bucket=dict,
        roofline=lambda f, p: Roofline(0, 0),
        head_axes=HeadAxes(inputs={"x": (1, "zero"), "w": (1, "zero")}, outputs={0: "sum"}),
    )
    x, w = torch.randn(3, 7, 5), torch.randn(3, 7)
    ref = head_sum(x, w)
    assert torch.allclose(split_heads(head_sum, op, 3)(x, w), ref, atol=1e-6)
    assert torch.allclose(pad_heads(head_sum, op, 16)(x, w), ref, atol=1e-6)
