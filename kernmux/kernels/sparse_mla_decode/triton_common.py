"""Triton helpers shared by the two sparse MLA decode bodies (``triton.py``: four column
tiles; ``triton_wide.py``: one tile): the MMA with its interpreter upcast, one
online-softmax step, the normaliser (NaN-preserving) and the per-row finish (sink,
empty rows)."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _dot(a, b, acc, UPCAST: tl.constexpr):
    """a @ b + acc in fp32. UPCAST (interpreter only): the Triton 3.9 interpreter
    computes bf16 x bf16 dots on the raw bits, so its operands go in as fp32."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    return tl.dot(a, b, acc)


@triton.jit
def _softmax_step(s, m_i, l_i):
    """One online-softmax step over scores s [H, N] (base 2, -inf where invalid):
    (new max, rescale of the old sums, probabilities, new sums)."""
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    # A head that has seen no valid slot yet keeps m = -inf: shift by 0 instead.
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    return m_new, alpha, p, l_i * alpha + tl.sum(p, axis=1)


@triton.jit
def _normaliser(m_i, l_i):
    """(1 / l, base-2 lse) of an online softmax with running max m and sum l. l = 0 (no
    valid slot) gives (0, -inf); a NaN l (a NaN score: NaN in q or in a selected row)
    gives NaN for both, so a NaN row is never taken for "no valid slot"."""
    empty = l_i == 0.0
    safe = tl.where(empty, 1.0, l_i)
    inv_l = tl.where(empty, 0.0, 1.0 / safe)
    lse2 = tl.where(empty, float("-inf"), m_i + tl.log2(safe))
    return inv_l, lse2


@triton.jit
def _abs_max(x):
    """max |x| over a tile, NaN entries ignored (a NaN in one head must not spread to the
    scale of the others; it reaches its own row through the dot)."""
    return tl.max(tl.where(x == x, tl.abs(x), 0.0))


@triton.jit
def _finish_row(o, lse2, sink_ptr, offs_h, h_mask, HAS_SINK: tl.constexpr):
    """(o [H, DT] already normalised, base-2 lse [H]) -> sink-scaled o, natural lse,
    with rows that saw no valid slot set to o = 0, lse = +inf."""
    empty = lse2 == float("-inf")
    lse = lse2 * 0.6931471805599453
    if HAS_SINK:
        sink = tl.load(sink_ptr + offs_h, mask=h_mask, other=0.0)
        o = o * (1.0 / (1.0 + tl.exp(sink - lse)))[:, None]
    o = tl.where(empty[:, None], 0.0, o)
    lse = tl.where(empty, float("inf"), lse)
    return o, lse
