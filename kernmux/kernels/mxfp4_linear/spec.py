"""What ``mxfp4_linear`` needs besides its reference: features, validation, inputs,
tolerance, fake outputs, tuning bucket, roofline and precision classes.

Tolerance (``compare``), per output element, against the reference of the kernel's
precision class: ``|got - ref| <= ulp(ref) + c * s`` where ``ulp`` is one unit in the last
place of the output dtype at ``|ref|`` (both sides are rounded to it, so they may land on
neighbouring values), ``s`` the larger of the RMS of the element's output row and of its
output column (the scale of the dot products' terms; a single entry may cancel to near
zero while its terms are large), and ``c`` = 2^-7 (bf16) / 2^-10 (fp16): room for a kernel
that rounds the product to the output dtype before adding the bias (two roundings at the
row's magnitude) and for float32 accumulation in another order. Non-finite entries must
match exactly (NaN where the reference is NaN, the same infinity); NaN never passes as a
number.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from kernmux.dispatch.platform import Platform
from kernmux.dispatch.registry import Comparison, FeatureSpec, PrecisionClass, Roofline
from kernmux.kernels.mxfp4_linear.formats import BLOCK
from kernmux.kernels.mxfp4_linear.reference import mxfp4_linear as reference
from kernmux.kernels.mxfp4_linear.reference import mxfp4_linear_w4a4

OP_NAME = "mxfp4_linear"
DOC = "y = x @ dequant(w)^T (+ bias) with OCP MX FP4 weights (E2M1 pairs per byte, E8M0 scale per 32 k); W4A16"

# The reference's own class: 4-bit weights, activations at their 16-bit dtype.
PRECISION = "W4A16"
PRECISION_CLASSES = (
    PrecisionClass(
        "W4A4",
        "activations quantized to MX FP4 as well (AITER gemm_afp4wfp4 + dynamic_mxfp4_quant): a coarser answer than W4A16",
        reference=mxfp4_linear_w4a4,
    ),
)

DTYPES = ("bf16", "fp16")
# Room for a second rounding at the row's magnitude, relative to the row/column RMS.
ROW_TOL = {"bf16": 2.0**-7, "fp16": 2.0**-10}

FEATURE_SPECS = (
    FeatureSpec("tokens", "int", "rows of x (M)", 16, minimum=1),
    FeatureSpec("n", "int", "output features (N, rows of w)", 256, minimum=1),
    FeatureSpec("k", "int", "input features (K, a multiple of 32)", 512, minimum=32),
    FeatureSpec("dtype", "str", "dtype of x and of the output", "bf16", choices=DTYPES),
    FeatureSpec("bias", "bool", "a bias vector is given", False),
)

SWEEP_DEFAULTS = {
    "tokens": (1, 5, 64),
    "n": (1, 96, 160),
    "k": (32, 256, 4128),
    "bias": (False, True),
}


def _torch_dtype(name: str):
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16}[name]


def _dtype_name(dtype: Any) -> str:
    import torch

    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, str(dtype).replace("torch.", ""))


def features(x, w, w_scale, bias=None) -> dict[str, Any]:
    """Shapes and dtypes only (no device synchronisation)."""
    return {
        "tokens": int(x.shape[0]),
        "n": int(w.shape[0]),
        "k": int(x.shape[1]),
        "dtype": _dtype_name(x.dtype),
        "bias": bias is not None,
        "device": x.device.type,
    }


def validate(x, w, w_scale, bias=None) -> None:
    """Shapes, dtypes, devices and emptiness; raises ValueError/TypeError naming the
    argument, what was expected and what was got. Scale values are not checked (that
    would synchronise the device): 255 is NaN by the format."""
    import torch

    named = {"x": x, "w": w, "w_scale": w_scale}
    for name, value in named.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"mxfp4_linear: {name} must be a torch.Tensor, got {type(value).__name__}")
    if bias is not None and not isinstance(bias, torch.Tensor):
        raise TypeError(f"mxfp4_linear: bias must be a torch.Tensor or None, got {type(bias).__name__}")
    if x.dtype not in (torch.bfloat16, torch.float16):
        raise TypeError(f"mxfp4_linear: x must be bfloat16 or float16, got {x.dtype}")
    for name in ("w", "w_scale"):
        if named[name].dtype != torch.uint8:
            raise TypeError(f"mxfp4_linear: {name} must be uint8 ({'packed E2M1 pairs' if name == 'w' else 'E8M0 scales'}), got {named[name].dtype}")
    for name, value in named.items():
        if value.dim() != 2:
            raise ValueError(f"mxfp4_linear: {name} must be 2-D, got shape {tuple(value.shape)}")
    m, k = x.shape
    n = w.shape[0]
    if m < 1 or k < 1 or n < 1:
        raise ValueError(f"mxfp4_linear: empty problem: x {tuple(x.shape)}, w {tuple(w.shape)}; M, N and K must be at least 1")
    if k % BLOCK:
        raise ValueError(f"mxfp4_linear: K = x.shape[1] must be a multiple of {BLOCK} (one E8M0 scale per {BLOCK} values), got {k}")
    if tuple(w.shape) != (n, k // 2):
        raise ValueError(f"mxfp4_linear: w must be [N, K/2] = [{n}, {k // 2}] (K = x.shape[1] = {k}), got {list(w.shape)}")
    if tuple(w_scale.shape) != (n, k // BLOCK):
        raise ValueError(f"mxfp4_linear: w_scale must be [N, K/32] = [{n}, {k // BLOCK}], got {list(w_scale.shape)}")
    if bias is not None:
        if tuple(bias.shape) != (n,):
            raise ValueError(f"mxfp4_linear: bias must be [N] = [{n}], got {list(bias.shape)}")
        if bias.dtype not in (x.dtype, torch.float32):
            raise TypeError(f"mxfp4_linear: bias must be {x.dtype} (x's dtype) or float32, got {bias.dtype}")
    tensors = dict(named, **({"bias": bias} if bias is not None else {}))
    for name, value in tensors.items():
        if value.device != x.device:
            raise ValueError(f"mxfp4_linear: {name} is on {value.device}, x is on {x.device}; all tensors must share a device")


def make_inputs(feats: Mapping[str, Any], device: Any, seed: int) -> tuple[tuple, dict]:
    """Fresh random inputs: x ~ N(0, 1); a float32 weight ~ N(0, 1/K) with every 8th block
    scaled by 2^±6 (so blocks use different E8M0 scales) quantized with the OCP rule; bias
    ~ N(0, 1) in x's dtype when asked for."""
    import torch

    from kernmux.kernels.mxfp4_linear.formats import quantize_mxfp4

    m, n, k = feats["tokens"], feats["n"], feats["k"]
    dtype = _torch_dtype(feats["dtype"])
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(n, k, generator=gen) * k**-0.5
    blocks = weight.view(n, k // BLOCK, BLOCK)
    spread = torch.randint(-6, 7, (n, k // BLOCK), generator=gen).float()
    spread[torch.rand(n, k // BLOCK, generator=gen) > 0.125] = 0.0
    blocks.mul_(torch.exp2(spread)[..., None])
    # Drawn on the CPU (the same inputs on every device), quantized where they are used.
    w, w_scale = quantize_mxfp4(weight.to(device))
    x = torch.randn(m, k, generator=gen).to(dtype)
    bias = torch.randn(n, generator=gen).to(dtype) if feats["bias"] else None
    return (x.to(device), w, w_scale, None if bias is None else bias.to(device)), {}


def make_nonfinite_inputs(feats: Mapping[str, Any], device: Any, seed: int) -> tuple[tuple, dict]:
    """``make_inputs`` with NaN in one row of x, +inf in another (when M > 1) and the NaN
    scale (255) on one block of w: the reference's rows and columns become NaN there."""
    (x, w, w_scale, bias), kwargs = make_inputs(feats, "cpu", seed)
    x[0, 0] = float("nan")
    if x.shape[0] > 1:
        x[-1, -1] = float("inf")
    w_scale[-1, 0] = 255
    return (x.to(device), w.to(device), w_scale.to(device), None if bias is None else bias.to(device)), kwargs


def _as_tensor(outputs: Any):
    if isinstance(outputs, (tuple, list)):
        if len(outputs) != 1:
            raise ValueError(f"expected one output, got {len(outputs)}")
        return outputs[0]
    return outputs


def _ulp(values, dtype) -> Any:
    """One unit in the last place of ``dtype`` at |values| (float64 tensor in, out)."""
    import torch

    info = torch.finfo(dtype)
    mantissa_bits = round(-math.log2(info.eps))  # 7 for bf16, 10 for fp16
    mags = values.abs().clamp_min(info.smallest_normal)
    _, exponent = torch.frexp(mags)
    # |v| in [2^(e-1), 2^e): one ulp is 2^(e - 1 - mantissa_bits).
    return torch.ldexp(torch.ones_like(mags), exponent - 1 - mantissa_bits)


def compare(outputs: Any, reference_outputs: Any, feats: Mapping[str, Any]) -> Comparison:
    """Elementwise ``|got - ref| <= ulp(ref) + c * max(row RMS, column RMS)`` (module
    docstring); non-finite entries exactly equal."""
    import torch

    got, ref = _as_tensor(outputs), _as_tensor(reference_outputs)
    if tuple(got.shape) != tuple(ref.shape):
        return Comparison(False, {}, f"shape {tuple(got.shape)} != reference {tuple(ref.shape)}")
    if got.dtype != ref.dtype:
        return Comparison(False, {}, f"dtype {got.dtype} != reference {ref.dtype}")
    dtype = ref.dtype
    got64, ref64 = got.detach().to("cpu", torch.float64), ref.detach().to("cpu", torch.float64)
    ref_nan, got_nan = torch.isnan(ref64), torch.isnan(got64)
    ref_inf = torch.isinf(ref64)
    finite = torch.isfinite(ref64)
    nan_mismatch = int((ref_nan != got_nan).sum())
    inf_mismatch = int((ref_inf & (got64 != ref64)).sum())
    got_nonfinite = int((finite & ~torch.isfinite(got64)).sum())
    ref_f = torch.where(finite, ref64, 0.0)
    count_row = finite.sum(dim=1, keepdim=True).clamp_min(1)
    count_col = finite.sum(dim=0, keepdim=True).clamp_min(1)
    rms_row = (ref_f.square().sum(dim=1, keepdim=True) / count_row).sqrt()
    rms_col = (ref_f.square().sum(dim=0, keepdim=True) / count_col).sqrt()
    scale = torch.maximum(rms_row, rms_col)
    allowed = _ulp(ref_f, dtype) + ROW_TOL.get(_dtype_name(dtype), 2.0**-7) * scale
    err = torch.where(finite & torch.isfinite(got64), (got64 - ref_f).abs(), 0.0)
    ratio = err / allowed
    worst = float(ratio.max()) if ratio.numel() else 0.0
    rel_fro = float(err.norm() / ref_f.norm().clamp_min(torch.finfo(torch.float64).tiny))
    metrics = {
        "max_err_over_tol": worst,
        "max_abs_err": float(err.max()) if err.numel() else 0.0,
        "rel_fro_err": rel_fro,
        "nan_mismatch": float(nan_mismatch),
        "inf_mismatch": float(inf_mismatch),
        "nonfinite_where_finite": float(got_nonfinite),
    }
    problems = []
    if nan_mismatch:
        problems.append(f"{nan_mismatch} entries differ in being NaN")
    if inf_mismatch:
        problems.append(f"{inf_mismatch} entries differ where the reference is infinite")
    if got_nonfinite:
        problems.append(f"{got_nonfinite} non-finite entries where the reference is finite")
    if worst > 1.0:
        row, col = divmod(int(ratio.argmax()), ratio.shape[1])
        problems.append(
            f"error {worst:.3g}x the tolerance at [{row}, {col}] (got {float(got64[row, col]):.6g}, "
            f"ref {float(ref64[row, col]):.6g}, allowed {float(allowed[row, col]):.3g})"
        )
    return Comparison(not problems, metrics, "; ".join(problems))


def fake(x, w, w_scale, bias=None):
    return x.new_empty((x.shape[0], w.shape[0]))


def _pow2_ceil(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def bucket(feats: Mapping[str, Any]) -> dict[str, Any]:
    """Tokens rounded up to a power of two (the decision changes with the batch); the
    weight shape, dtype and bias exact."""
    out = dict(feats)
    out["tokens"] = _pow2_ceil(feats["tokens"])
    return out


def roofline(feats: Mapping[str, Any], platform: Platform) -> Roofline:
    """Bytes: packed weights N*K/2 + scales N*K/32 + x M*K*2 + y M*N*2 (+ bias N*2).
    FLOPs: 2*M*N*K."""
    m, n, k = feats["tokens"], feats["n"], feats["k"]
    size = 2  # bf16 / fp16
    moved = n * k / 2 + n * k / BLOCK + m * k * size + m * n * size + (n * size if feats["bias"] else 0)
    return Roofline(bytes=float(moved), flops=2.0 * m * n * k)
