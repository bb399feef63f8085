"""moe_topk_softmax's CPU kernels, ``torch_topk`` and ``numba``: bitwise the reference's
answer, ties included, and the CPU default (``numba`` where it is installed, else
``torch_topk``).

The kernels run on CPU tensors only, whatever device the suite runs on. ``torch_topk``
rests on one claim (packed int64 keys order exactly as the reference's stable sort);
``numba`` on another (the k-th largest group maximum bounds the k-th largest expert, and
the candidates above it are ranked with the tie rule). So beside the parity grid these
tests aim at what breaks such claims: ties everywhere (small-integer logits, bf16
rounding, underflow to 0), NaN of either sign, the tie at the k-th place, k = E, rows
where every expert is a candidate, and both group layouts of ``numba``. Every test runs
for both kernels; ``numba``'s are skipped where numba is not installed.
"""

from __future__ import annotations

import importlib.util
import zlib

import pytest
import torch

from kernmux.dispatch.platform import current_platform
from kernmux.dispatch.registry import REGISTRY
from kernmux.dispatch.verify import verify_kernel
from kernmux.kernels.moe_topk_softmax import spec
from kernmux.kernels.moe_topk_softmax.reference import moe_topk_softmax as reference
from tests.kernels.test_moe_topk_softmax import _tie_cases, _verify_on

OP = "moe_topk_softmax"
KERNELS = ["torch_topk", pytest.param("numba", marks=pytest.mark.skipif(
    importlib.util.find_spec("numba") is None, reason="numba not installed (the cpu extra)"))]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _seed(*parts: object) -> int:
    return zlib.crc32(repr(parts).encode())


def _features(tokens, experts, topk, shared, dtype, renormalize, padding=False):
    return {"tokens": tokens, "experts": experts, "topk": topk, "shared": shared, "dtype": dtype,
            "renormalize": renormalize, "padding": padding, "device": "cpu"}


@pytest.fixture(params=KERNELS)
def kernel_name(request) -> str:
    return request.param


def _kernel(name):
    return REGISTRY.kernels_of(OP)[name].bind()


def _assert_same_as_reference(name, logits, topk, renormalize=False, num_shared=0, is_padding=None):
    got_w, got_ids = _kernel(name)(logits, topk, renormalize, num_shared, is_padding)
    want_w, want_ids = reference(logits, topk, renormalize, num_shared, is_padding)
    assert torch.equal(got_ids, want_ids), (got_ids, want_ids)
    # Bitwise, NaN where the reference has NaN: the same fp32 expressions in the same order.
    assert torch.equal(torch.isnan(got_w), torch.isnan(want_w))
    assert torch.equal(got_w.nan_to_num(nan=-7.0), want_w.nan_to_num(nan=-7.0))
    assert got_w.dtype == torch.float32 and got_ids.dtype == torch.int32


@pytest.mark.parametrize("renormalize", [False, True])
@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("shared", [0, 2])
@pytest.mark.parametrize("experts,topk", [(160, 6), (288, 8), (8, 8), (1, 1)])
def test_parity_grid(kernel_name, experts, topk, shared, dtype, renormalize):
    feats = _features(7, experts, topk, shared, dtype, renormalize)
    result = verify_kernel(OP, kernel_name, feats, seed=_seed(feats))
    assert result.passed, f"{result.status}: {result.detail} {dict(result.metrics)}"


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp16"])
def test_ties_go_to_the_lower_index(kernel_name, dtype):
    for row, topk, expected in _tie_cases():
        logits = row.to(DTYPES[dtype]).unsqueeze(0).repeat(3, 1)
        _, ids = _kernel(kernel_name)(logits, topk, False, 0, None)
        assert ids.tolist() == [expected] * 3, (row.tolist(), ids.tolist())
        _assert_same_as_reference(kernel_name, logits, topk)


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("low,high", [(-3, 4), (0, 2)])
def test_many_ties_match_reference(kernel_name, dtype, low, high):
    """Small-integer logits: most probabilities tie, at the k-th place too."""
    gen = torch.Generator().manual_seed(_seed("ties", dtype, low))
    logits = torch.randint(low, high, (64, 160 + 2), generator=gen).to(DTYPES[dtype])
    for renormalize in (False, True):
        _assert_same_as_reference(kernel_name, logits, 8, renormalize, 2)


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_router_like_logits_with_rounding_ties(kernel_name, dtype):
    """Normal logits rounded to 16 bits: many rows hold exactly equal values."""
    gen = torch.Generator().manual_seed(_seed("router", dtype))
    logits = (torch.randn(512, 160, generator=gen) * 2).to(DTYPES[dtype])
    _assert_same_as_reference(kernel_name, logits, 6, True)


def test_k_equals_experts_and_one_expert(kernel_name):
    gen = torch.Generator().manual_seed(_seed("k=E"))
    logits = torch.randint(-2, 2, (5, 16), generator=gen).float()
    _assert_same_as_reference(kernel_name, logits, 16)
    _assert_same_as_reference(kernel_name, torch.randn(4, 1, generator=gen), 1)


def test_nan_rows_of_either_sign_and_payload(kernel_name):
    """NaN rows get ids 0..k-1 whatever NaNs the softmax produces (a NaN logit, +inf,
    all -inf, a negative NaN, a NaN with a payload)."""
    logits = torch.randn(6, 40)
    logits[0, 3] = float("nan")
    logits[1, 7] = float("inf")
    logits[2] = float("-inf")
    logits[3, 5] = -float("nan")
    logits[4, 9] = torch.tensor(0x7FC00123, dtype=torch.int32).view(torch.float32)
    logits[4, 11] = torch.tensor(-0x00400001, dtype=torch.int32).view(torch.float32)  # 0xFFBFFFFF: a negative NaN
    logits[5, :20] = float("-inf")
    assert torch.isnan(logits[4, 11])
    for topk in (1, 6, 40):
        _assert_same_as_reference(kernel_name, logits, topk, True)
        _, ids = _kernel(kernel_name)(logits, topk, False, 0, None)
        for row in range(5):
            assert ids[row].tolist() == list(range(topk))


def test_top_ids_order_nan_rows_by_index_whatever_their_bits():
    """The softmax of this torch gives one NaN bit pattern per row; another build may
    not. Rows of mixed NaNs (both signs, payloads) still give ids 0..k-1."""
    from kernmux.kernels.moe_topk_softmax.cpu import top_ids

    patterns = torch.tensor([0x7FC00000, -0x00400000, 0x7FC00123, -0x00000001, 0x7F800001], dtype=torch.int32)
    rows = patterns[torch.randint(0, 5, (4, 24), generator=torch.Generator().manual_seed(3))]
    probs = rows.view(torch.float32)
    assert torch.isnan(probs).all() and len(set(rows.flatten().tolist())) > 1
    assert top_ids(probs, 5).tolist() == [list(range(5))] * 4


def test_nonfinite_inputs_pass_verify(kernel_name):
    feats = _features(8, 160, 6, 2, "bf16", True, padding=True)
    result, _, _ = _verify_on(spec.make_nonfinite_inputs, kernel_name, feats, _seed("nonfinite"))
    assert result.passed, result.detail


def test_padding_zero_tokens_and_non_contiguous(kernel_name):
    gen = torch.Generator().manual_seed(_seed("layout"))
    base = torch.randn(9, 170, generator=gen)
    view = base[:, 3:165]  # 160 routed + 2 shared, row stride 170
    mask = torch.rand(9, generator=gen) < 0.4
    mask[-1] = True
    _assert_same_as_reference(kernel_name, view, 6, True, 2, mask)
    _assert_same_as_reference(kernel_name, torch.randn(30, 9, generator=gen).t(), 3)
    weights, ids = _kernel(kernel_name)(torch.empty(0, 66), 4, False, 2, torch.zeros(0, dtype=torch.bool))
    assert weights.shape == (0, 6) and ids.shape == (0, 6)


def test_chosen_by_default_on_cpu_and_not_offered_for_gpu_tensors(monkeypatch):
    """numba is the CPU default where it is installed; without it (a what-if platform
    where the distribution is absent), torch_topk. Neither takes GPU tensors."""
    from kernmux.runtime import make_dispatcher

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # as outside the test suite: no Triton on CPU
    features = {**REGISTRY.op(OP).default_features("cpu")}
    here = current_platform()
    with_numba = importlib.util.find_spec("numba") is not None
    decision = make_dispatcher(use_tuning_db=False, run_self_checks=False).decide(OP, features)
    assert decision.kernel == ("numba" if with_numba else "torch_topk") and decision.source == "priority", decision
    without = here.with_overrides(libs={"numba": None})
    decision = make_dispatcher(platform=without, use_tuning_db=False, run_self_checks=False).decide(OP, features)
    assert decision.kernel == "torch_topk" and decision.source == "priority", decision
    assert "numba not installed" in REGISTRY.kernels_of(OP)["numba"].availability(without).reason
    for name in ("torch_topk", "numba"):
        support = REGISTRY.kernels_of(OP)[name].check({**REGISTRY.op(OP).default_features("cuda")}, here)
        assert not support.ok and "CPU tensors only" in support.reason


def test_numba_that_does_not_import_is_unavailable_with_its_error(monkeypatch):
    """An installed numba that fails to import (e.g. a NumPy newer than it supports) is
    a reason in explain, not a crash at the first routed batch."""
    import importlib

    from kernmux.kernels import moe_topk_softmax as package

    real = importlib.import_module

    def fake(name, *args):
        if name == "numba":
            raise ImportError("Numba needs NumPy 2.3 or less. Got NumPy 9.9.")
        return real(name, *args)

    monkeypatch.setattr(importlib, "import_module", fake)
    support = package._numba_probe(current_platform())
    assert not support.ok and "does not import" in support.reason and "NumPy 9.9" in support.reason


@pytest.mark.skipif(importlib.util.find_spec("numba") is None, reason="numba not installed (the cpu extra)")
def test_numba_without_a_writable_cache_still_compiles(monkeypatch):
    """Numba refuses ``cache=True`` where it has nowhere to write (a read-only install,
    no user cache directory): the kernel then compiles without the cache."""
    import numba

    from kernmux.kernels.moe_topk_softmax import cpu_select

    real = numba.njit

    def no_locator(*args, **kwargs):
        if kwargs.get("cache"):
            raise RuntimeError("cannot cache function 'select_rows': no locator available for file")
        return real(*args, **kwargs)

    monkeypatch.setattr(numba, "njit", no_locator)
    monkeypatch.setattr(cpu_select, "_COMPILED", None)
    logits = torch.randn(5, 160)
    weights, ids = cpu_select.moe_topk_softmax(logits, 6)
    want_w, want_ids = reference(logits, 6)
    assert torch.equal(ids, want_ids) and torch.equal(weights, want_w)


# The selection itself, run as plain Python (no Numba: the same source Numba compiles), so
# its passes are checked where numba is absent too. Shapes stay small: pure Python loops.


def _select_in_python(probs: torch.Tensor, topk: int) -> tuple[torch.Tensor, torch.Tensor]:
    from kernmux.kernels.moe_topk_softmax.cpu_select import select_rows

    weights, ids = select_rows(probs.contiguous().numpy(), topk)
    return torch.from_numpy(weights), torch.from_numpy(ids)


def _reference_top(probs: torch.Tensor, topk: int) -> tuple[torch.Tensor, torch.Tensor]:
    values, order = torch.sort(probs, dim=-1, descending=True, stable=True)
    return values[:, :topk], order[:, :topk].to(torch.int32)


@pytest.mark.parametrize("experts,topk", [
    (160, 6),   # 16-expert groups (E >= 16k): 10 groups
    (96, 6),    # exactly 16k
    (95, 6),    # just under: groups of E // 2k = 7, the last one short
    (13, 4),    # groups of one
    (288, 8),   # 16-expert groups, 18 of them
    (7, 7),     # k = E
    (1, 1),
])
@pytest.mark.parametrize("kind", ["normal", "small_ints", "zeros_and_ties", "nan_rows"])
def test_selection_passes_in_plain_python(experts, topk, kind):
    gen = torch.Generator().manual_seed(_seed("select", experts, topk, kind))
    if kind == "normal":
        logits = torch.randn(9, experts, generator=gen).bfloat16().float()
    elif kind == "small_ints":
        logits = torch.randint(-2, 2, (9, experts), generator=gen).float()
    elif kind == "zeros_and_ties":
        logits = torch.zeros(9, experts)  # every expert a candidate: the k-pass path
        logits[1::2, : experts // 2] = float("-inf")  # probability 0 ties beside equal ones
    else:
        logits = torch.randn(9, experts, generator=gen)
        logits[0, experts // 2] = float("nan")
        logits[3] = float("-inf")
        logits[5, 0] = float("inf")
    probs = torch.softmax(logits, dim=-1)
    if kind == "nan_rows":  # NaNs of other signs and payloads than the softmax's own
        probs[7, :: max(1, experts // 3)] = torch.tensor(-0x00400000, dtype=torch.int32).view(torch.float32)
    got_w, got_ids = _select_in_python(probs, topk)
    want_w, want_ids = _reference_top(probs, topk)
    assert torch.equal(got_ids, want_ids), (got_ids, want_ids)
    assert torch.equal(got_w.view(torch.int32), want_w.view(torch.int32))


def test_selection_ranks_a_tie_at_the_kth_place_by_index():
    """Two equal probabilities straddle the k-th place, the lower-index one in a later
    group than a larger one: the group bound keeps both, the rank orders them by index."""
    probs = torch.zeros(1, 160)
    probs[0, [3, 40, 41, 100, 150, 151, 152]] = torch.tensor([0.1, 0.3, 0.2, 0.2, 0.05, 0.08, 0.07])
    got_w, got_ids = _select_in_python(probs, 3)
    assert got_ids.tolist() == [[40, 41, 100]]
    want_w, want_ids = _reference_top(probs, 3)
    assert torch.equal(got_ids, want_ids) and torch.equal(got_w, want_w)
