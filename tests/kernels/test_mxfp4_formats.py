"""MX FP4 quantize / dequantize against hand-computed E2M1 and E8M0 values.

E2M1 magnitudes by code: 0:0, 1:0.5 (the subnormal), 2:1, 3:1.5, 4:2, 5:3, 6:4, 7:6;
code + 8 is the negative (8 is -0). E8M0 byte s is 2^(s-127). The OCP shared exponent of
a block is floor(log2(amax)) - 2.
"""

from __future__ import annotations

import math

import pytest
import torch

from kernmux.kernels.mxfp4_linear.formats import (
    dequantize_mxfp4,
    e2m1_table,
    e8m0_table,
    pack_e2m1,
    quantize_dequantize,
    quantize_mxfp4,
    unpack_e2m1,
)


def block(*values: float, fill: float = 0.0) -> torch.Tensor:
    """One row holding ``values`` then ``fill`` up to 32 entries."""
    row = list(values) + [fill] * (32 - len(values))
    return torch.tensor([row], dtype=torch.float32)


def codes_and_scale(x: torch.Tensor, rule: str = "ocp") -> tuple[list[int], list[int]]:
    packed, scales = quantize_mxfp4(x, rule)
    return unpack_e2m1(packed)[0].tolist(), scales[0].tolist()


def test_tables():
    assert e2m1_table().tolist() == [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]
    assert torch.signbit(e2m1_table()[8])
    table = e8m0_table()
    assert table[127] == 1.0 and table[128] == 2.0 and table[126] == 0.5
    assert table[254] == 2.0**127
    assert table[0] == 2.0**-127 and table[0] > 0  # a float32 subnormal, kept exactly
    assert table[1] == 2.0**-126
    assert math.isnan(table[255])


def test_every_code_round_trips_and_packs_low_nibble_first():
    values = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]
    x = block(*values, *values)
    packed, scales = quantize_mxfp4(x)
    # amax 6: floor(log2 6) - 2 = 0 -> byte 127; codes 0..15 in order, element 2i low.
    assert scales.tolist() == [[127]]
    assert packed[0, :8].tolist() == [0x10, 0x32, 0x54, 0x76, 0x98, 0xBA, 0xDC, 0xFE]
    back = dequantize_mxfp4(packed, scales)
    assert back[0, :16].tolist() == values
    assert torch.signbit(back[0, 8]) and not torch.signbit(back[0, 0])


def test_pack_unpack_order():
    codes = torch.tensor([[1, 2, 3, 4]])
    assert pack_e2m1(codes).tolist() == [[0x21, 0x43]]
    assert unpack_e2m1(torch.tensor([[0x21, 0x43]], dtype=torch.uint8)).tolist() == [[1, 2, 3, 4]]


@pytest.mark.parametrize(
    "value, code",
    [
        (0.25, 0),   # tie 0 / 0.5 -> even code 0
        (0.26, 1),   # the subnormal 0.5
        (0.75, 2),   # tie 0.5 / 1 -> even code 2 (1.0)
        (1.25, 2),   # tie 1 / 1.5 -> 1
        (1.75, 4),   # tie 1.5 / 2 -> 2
        (2.4, 4),
        (2.5, 4),    # tie 2 / 3 -> 2
        (2.6, 5),
        (3.5, 6),    # tie 3 / 4 -> 4
        (5.0, 6),    # tie 4 / 6 -> 4
        (5.1, 7),
        (-0.25, 8),  # -0: the sign survives rounding to zero
        (-5.0, 14),
    ],
)
def test_round_to_nearest_even(value, code):
    # amax 6 keeps the scale at 2^0 so the element is rounded as written.
    codes, scales = codes_and_scale(block(6.0, value))
    assert scales == [127] and codes[1] == code


def test_largest_finite_and_saturation():
    # amax 7: floor(log2 7) - 2 = 0, so 7 and 6.5 saturate to 6 (code 7).
    codes, scales = codes_and_scale(block(7.0, 6.5, -7.9))
    assert scales == [127] and codes[:3] == [7, 7, 15]
    # amax 12: shared exponent 1 (byte 128); 12 / 2 = 6 exactly.
    x = block(12.0, 1.0)
    assert quantize_dequantize(x)[0, :2].tolist() == [12.0, 1.0]
    assert codes_and_scale(x)[1] == [128]


def test_all_zero_block_gets_the_smallest_scale():
    packed, scales = quantize_mxfp4(torch.zeros(2, 64))
    assert scales.tolist() == [[0, 0], [0, 0]] and packed.eq(0).all()
    assert dequantize_mxfp4(packed, scales).eq(0).all()


def test_scale_extremes():
    # amax 2^-125: shared exponent -127 (byte 0); 2^-125 / 2^-127 = 4 (code 6), exact back.
    tiny = block(2.0**-125, 2.0**-127)
    codes, scales = codes_and_scale(tiny)
    assert scales == [0] and codes[:2] == [6, 2]
    assert quantize_dequantize(tiny)[0, :2].tolist() == [2.0**-125, 2.0**-127]
    # A float32 subnormal amax (2^-130) clamps at byte 0 and rounds to zero (2^-3 < 0.25).
    codes, scales = codes_and_scale(block(2.0**-130))
    assert scales == [0] and codes[0] == 0
    # amax 1.5 * 2^127: floor(log2) = 127, shared 125 (byte 252), element 6 (code 7).
    huge = block(1.5 * 2.0**127, -(2.0**126))
    codes, scales = codes_and_scale(huge)
    assert scales == [252] and codes[:2] == [7, 12]
    assert quantize_dequantize(huge)[0, :2].tolist() == [1.5 * 2.0**127, -(2.0**126)]


def test_non_finite_block_becomes_nan_and_other_blocks_are_untouched():
    x = torch.cat([block(1.0, float("nan")), block(float("inf"), 2.0), block(3.0)], dim=1)
    packed, scales = quantize_mxfp4(x)
    # The finite block: amax 3 -> floor(log2 3) - 2 = -1 (byte 126), 3 / 2^-1 = 6 exactly.
    assert scales.tolist() == [[255, 255, 126]]
    back = dequantize_mxfp4(packed, scales)
    assert back[0, :64].isnan().all() and back[0, 64] == 3.0


def test_even_rule_rounds_the_amax_up_from_mantissa_1_75():
    # amax 7.5 = 1.875 * 2^2: OCP keeps exponent 0 (7.5 -> 6), AITER's "even" rule uses 1.
    assert codes_and_scale(block(7.5), "ocp") == ([7] + [0] * 31, [127])
    assert codes_and_scale(block(7.5), "even") == ([6] + [0] * 31, [128])  # 7.5 / 2 -> 4
    # amax 6.9 = 1.725 * 2^2: both rules agree.
    assert codes_and_scale(block(6.9), "even")[1] == [127]


def test_random_round_trip_is_idempotent_and_bounded():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(37, 256, generator=gen) * torch.exp2(torch.randint(-30, 30, (37, 1), generator=gen).float())
    packed, scales = quantize_mxfp4(x)
    back = dequantize_mxfp4(packed, scales)
    assert torch.equal(quantize_mxfp4(back)[0], packed) and torch.equal(quantize_mxfp4(back)[1], scales)
    # The largest error is saturation of [6, 8) to 6: below 2 units of the block scale.
    unit = e8m0_table()[scales.long()].repeat_interleave(32, dim=1)
    assert ((back - x).abs() < 2 * unit).all()
    assert torch.equal(quantize_mxfp4(x.bfloat16())[1], quantize_mxfp4(x.bfloat16().float())[1])


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="multiple of 32"):
        quantize_mxfp4(torch.zeros(2, 48))
    with pytest.raises(TypeError, match="floating-point"):
        quantize_mxfp4(torch.zeros(2, 32, dtype=torch.int32))
    with pytest.raises(ValueError, match="scale_rule"):
        quantize_mxfp4(torch.zeros(2, 32), "nearest")
    with pytest.raises(ValueError, match=r"w_scale must be \[N, K/32\] = \[2, 1\]"):
        dequantize_mxfp4(torch.zeros(2, 16, dtype=torch.uint8), torch.zeros(2, 2, dtype=torch.uint8))
