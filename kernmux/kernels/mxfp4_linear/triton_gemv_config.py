"""Config space, pruning and the shape heuristic of the decode kernel ``triton_gemv``
(pure Python: read at registration, no triton import).

Every key's value 0 means "chosen per problem by :func:`auto_config`".

- ``MODE``: how the decoded weights meet the activations (accumulation is float32 in
  all three). ``MODE_FMA`` (1): CUDA-core fused multiply-adds, one or two rows of x per
  program held in registers (more rows: more programs along M, each reading the
  weights again). ``MODE_DOT`` (2): the decoded tile, scaled and rounded to x's dtype,
  back in k order, one ``tl.dot(w, x^T)`` per block with x padded to 16 rows (the
  weights are the dot's left operand: "swap AB"). ``MODE_DOT_BY_POSITION`` (3): the same
  as eight dots, one per position of a value in its 32-bit word, x split by position
  (the packed words reach the dot's operand layout without a pass through shared memory;
  needs ``BLOCK_K >= 128``).
- ``BLOCK_N`` output columns and ``BLOCK_K`` values of k per program iteration (the
  program reads ``BLOCK_N x BLOCK_K/2`` packed bytes per iteration as 32-bit words, 16
  bytes = one scale group per thread and load).
- ``SPLIT_K``: programs along K; their float32 partials are summed in split order, so the
  result does not depend on which program finishes first (deterministic).
- ``REDUCE``: who sums the partials. ``REDUCE_KERNEL`` (1): a second kernel.
  ``REDUCE_LAST_PROGRAM`` (2): the last program of each output tile to finish (a
  per-tile arrival counter) sums them in the same launch -- one launch instead of two,
  the same bits.
- ``num_warps``; ``num_stages``: Triton's pipelining for the dot modes; for
  ``MODE_FMA`` (a loop without a dot, which Triton does not pipeline) ``num_stages >= 2``
  loads the next block before decoding this one (register double-buffering).

Cost model on paper (H200: 132 SMs at ~1.98 GHz, 4 schedulers each: ~33.5e12 thread
instructions/s; copy ceiling ~4.2 TB/s). At the ceiling the kernel streams 0.53 bytes
per weight value, ~8e12 values/s: ~4.2 instructions per value fit in the issue budget,
~7 at 60% of the ceiling. Decoding costs ~3 per value (2 integer operations per value
building two IEEE halves in one word, 1 exact conversion), the per-group scale ~0.1.
``MODE_FMA`` adds one FMA per value and row: ~4.5 per value at M = 1 (sm_90 SASS of
the heuristic config: ~5.5 in the loop, x included), ~6 at M = 2, ~9 at M = 4 (~45% of
the ceiling at best), ~20 at M = 16. The dot modes multiply each value by its scale (2)
and round it (0.5) instead, ~6 per value whatever M is, plus shared-memory traffic (x
in MODE 3, x and the decoded tile in MODE 2: ~4 bytes per value, about an SM's shared
bandwidth at the copy ceiling). Hence the default: FMA for M <= 2, MODE 3 from M = 3.
``benchmarks/mxfp4_linear.py --explore-decode`` measures the alternatives.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

MODE_FMA, MODE_DOT, MODE_DOT_BY_POSITION = 1, 2, 3
REDUCE_KERNEL, REDUCE_LAST_PROGRAM = 1, 2
KEYS = ("MODE", "BLOCK_N", "BLOCK_K", "SPLIT_K", "REDUCE", "num_warps", "num_stages")

# The kernel is for decode: rows of x up to this many (larger M: the ``triton`` GEMM).
MAX_TOKENS = 16
# ``MODE_FMA`` up to this many rows by default (the cost model above).
FMA_MAX_TOKENS = 2
# Rows of x one MODE_FMA program holds in registers.
FMA_ROWS = 2
# Rows of x a dot is padded to (tl.dot needs every dimension >= 16).
DOT_ROWS = 16

CONFIG_SPACE: dict[str, tuple[int, ...]] = {
    "MODE": (0, MODE_FMA, MODE_DOT, MODE_DOT_BY_POSITION),
    "BLOCK_N": (0, 8, 16, 32, 64, 128),
    "BLOCK_K": (0, 128, 256, 512, 1024),
    "SPLIT_K": (0, 1, 2, 4, 8, 16, 32),
    "REDUCE": (0, REDUCE_KERNEL, REDUCE_LAST_PROGRAM),
    "num_warps": (0, 2, 4, 8),
    "num_stages": (0, 1, 2, 3, 4),
}
DEFAULT_CONFIG: dict[str, int] = {key: 0 for key in KEYS}

# Programs the heuristic aims for: several per SM, so that each SM has enough loads in
# flight (~20-25 KB at ~4.2 TB/s and ~0.7 us latency) while others wait.
PROGRAMS_PER_UNIT = 4
# Float32 partials of split-K (written, then read by the reduction) at most this
# fraction of the weight bytes (0.53 per value).
PARTIAL_TRAFFIC = 0.25
WEIGHT_BYTES_PER_VALUE = 0.5 + 1 / 32
# Weight values one thread holds decoded per iteration (registers: two float32 per
# packed byte, before the dot's or the FMAs' own).
MAX_VALUES_PER_THREAD = 256


def _pow2_ceil(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def block_m(mode: int, tokens: int) -> int:
    """Rows of x per program: 16 for the dot, 1 or 2 for FMA (more rows: more programs
    along M, each reading the weights again)."""
    return min(tokens, FMA_ROWS) if mode == MODE_FMA else DOT_ROWS


def splits_run(k: int, block_k: int, split_k: int) -> tuple[int, int]:
    """(programs along K, values of k per program) that a launch with ``split_k`` uses:
    whole BLOCK_K blocks per program and no program without work."""
    k_blocks = _cdiv(k, block_k)
    split = max(1, min(split_k, k_blocks))
    k_per_split = _cdiv(k_blocks, split) * block_k
    return _cdiv(k, k_per_split), k_per_split


def default_mode(tokens: int) -> int:
    """The cost model's pick (module docstring): FMA for M <= 2, the dots above."""
    return MODE_FMA if tokens <= FMA_MAX_TOKENS else MODE_DOT_BY_POSITION


def auto_config(tokens: int, n: int, k: int, units: int = 132, interpret: bool = False, mode: int = 0) -> dict[str, int]:
    """A config by problem shape (a starting point; the tuning database refines it), for
    ``mode`` (0: :func:`default_mode`).

    Split-K until there are ``PROGRAMS_PER_UNIT`` programs per SM (N = 1536 alone gives
    96 tiles of 16 columns for 132 SMs), as long as the float32 partials (written and
    read once) stay within ``PARTIAL_TRAFFIC`` of the weight bytes; the dot modes narrow
    their column tiles (64 -> 16) when splitting alone does not get there. Under the
    interpreter, few and large blocks keep tests fast (its cost is per program and
    operation)."""
    mode = mode or default_mode(tokens)
    if interpret:
        block_n = 16 if n <= 256 else 64  # fewer programs: the interpreter's cost is per program
        block_k, warps, stages = max(min(256, _pow2_ceil(k)), 32 if mode != MODE_DOT_BY_POSITION else 128), 4, 1
        return {"MODE": mode, "BLOCK_N": block_n, "BLOCK_K": block_k, "SPLIT_K": splits_run(k, block_k, 2 if k >= 4 * block_k else 1)[0],
                "REDUCE": REDUCE_LAST_PROGRAM, "num_warps": warps, "num_stages": stages}
    if mode == MODE_FMA:
        # 16 rows x 128-256 bytes per iteration, the next block prefetched. BLOCK_K 256 up
        # to K = 8192 and 512 beyond: the fastest of the explored configs at M = 1 on the
        # H200 for all five benchmark shapes
        # (benchmarks/results/h200/mxfp4_linear_explore_decode_h200.md).
        block_n, block_k, warps, stages = 16, 256 if k <= 8192 else 512, 4, 2
    else:
        block_n, block_k, warps, stages = 64, 256, 4, 3
    min_n = 8 if mode == MODE_FMA else 16
    block_n = min(block_n, max(min_n, _pow2_ceil(n)))
    block_k = min(block_k, max(128, _pow2_ceil(k)))
    target = PROGRAMS_PER_UNIT * units
    rows = min(tokens, FMA_ROWS) if mode == MODE_FMA else tokens  # rows whose partials are stored
    max_split = max(1, int(k * WEIGHT_BYTES_PER_VALUE * PARTIAL_TRAFFIC / (2 * 4 * rows)))
    while True:
        tiles = _cdiv(n, block_n) * _cdiv(tokens, block_m(mode, tokens))
        split = 1
        # Double while below the target, within the traffic bound, and adding programs.
        while (2 * split <= min(32, max_split) and tiles * splits_run(k, block_k, split)[0] < target
               and splits_run(k, block_k, 2 * split)[0] > splits_run(k, block_k, split)[0]):
            split *= 2
        if mode == MODE_FMA or block_n <= min_n or tiles * splits_run(k, block_k, split)[0] >= target:
            break
        block_n //= 2
    return {"MODE": mode, "BLOCK_N": block_n, "BLOCK_K": block_k, "SPLIT_K": splits_run(k, block_k, split)[0],
            "REDUCE": REDUCE_LAST_PROGRAM, "num_warps": warps, "num_stages": stages}


def resolve_config(config: Mapping[str, Any], tokens: int, n: int, k: int, units: int = 132, interpret: bool = False) -> dict[str, int]:
    """``config`` with every 0 (or missing key) replaced by :func:`auto_config`'s value
    (for the config's ``MODE`` when it names one)."""
    auto = auto_config(tokens, n, k, units, interpret, mode=int(config.get("MODE") or 0))
    return {key: int(config.get(key) or 0) or auto[key] for key in KEYS}


def config_problem(config: Mapping[str, Any], feats: Mapping[str, Any]) -> str:
    """Why a config cannot or should not run this problem, or ""."""
    tokens, n, k = feats["tokens"], feats["n"], feats["k"]
    if tokens > MAX_TOKENS:
        return f"{tokens} rows: the decode kernel takes up to {MAX_TOKENS}"
    full = resolve_config(config, tokens, n, k)
    mode, bn, bk, split, warps = full["MODE"], full["BLOCK_N"], full["BLOCK_K"], full["SPLIT_K"], full["num_warps"]
    if mode != MODE_FMA and bn < 16:
        return f"BLOCK_N={bn} < 16 (tl.dot needs every dimension >= 16)"
    if mode == MODE_DOT_BY_POSITION and bk < 128:
        return f"BLOCK_K={bk} < 128 (MODE {mode}: dots over BLOCK_K/8 >= 16 values)"
    if bn > max(16, _pow2_ceil(n)):
        return f"BLOCK_N={bn} > N rounded up ({max(16, _pow2_ceil(n))})"
    if bk > max(128, _pow2_ceil(k)):
        return f"BLOCK_K={bk} > K rounded up ({max(128, _pow2_ceil(k))})"
    if split > _cdiv(k, bk):
        return f"SPLIT_K={split} > K blocks ({_cdiv(k, bk)})"
    threads = 32 * warps
    values = bn * bk // threads
    if values > MAX_VALUES_PER_THREAD:
        return f"{bn}x{bk} weight values over {threads} threads: {values} per thread > {MAX_VALUES_PER_THREAD}"
    return ""


def config_valid(config: Mapping[str, Any], feats: Mapping[str, Any]) -> bool:
    return not config_problem(config, feats)
