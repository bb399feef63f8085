"""Config space of the Triton kernel, importable without Triton (the registry needs it).

``rows``: tokens per program; ``num_warps``: warps per program; ``select``: how the k
picks are made — "packed" (one int64 max-reduction per pick), "twopass" (a max- then a
min-reduction per pick) or "bitonic" (``tl.topk``'s compare-exchange network over the
packed keys). 6 x 4 x 3 = 72 points; :func:`config_valid` prunes those that spill
registers, leave warps idle or cover more rows than the problem has.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

CONFIG_SPACE: dict[str, tuple[Any, ...]] = {
    "rows": (1, 2, 4, 8, 16, 32),
    "num_warps": (1, 2, 4, 8),
    "select": ("packed", "twopass", "bitonic"),
}

MAX_EXPERTS = 1024
MAX_TOPK = 16

# Register budget: an fp32 value and an int64 key per tile element; past this many
# elements per thread the tile spills to local memory.
_MAX_ELEMS_PER_THREAD = 64


def next_power_of_two(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def block_e(experts: int) -> int:
    """Tile width: the next power of two >= E (at least 16), the tail masked."""
    return max(16, next_power_of_two(experts))


def config_valid(config: Mapping[str, Any], features: Mapping[str, Any]) -> bool:
    """False for configs that would spill registers, idle warps or overshoot the tokens.

    Keys the config leaves out are the launcher's heuristic ones (an empty config is the
    heuristic default), so a partial config is judged as it will run."""
    width = block_e(int(features["experts"]))
    config = {**heuristic_config(max(1, int(features["tokens"])), int(features["experts"])), **config}
    rows, warps = int(config["rows"]), int(config["num_warps"])
    elems = rows * width
    if elems > _MAX_ELEMS_PER_THREAD * 32 * warps:
        return False
    if elems < 32 * warps:
        return False
    return rows <= next_power_of_two(max(1, int(features["tokens"])))


def heuristic_config(tokens: int, experts: int) -> dict[str, Any]:
    """The untuned default, used for every key a caller's config leaves out.

    From the H100 runs (benchmarks/results/moe_topk_softmax_h100_run{1,2}.md, bf16,
    k = 8): one warp per program beat two or more at every size measured; several
    tokens per program paid off only for tiles narrower than 256; the bitonic network
    beat the two-pass pick at decode sizes (up to 128 tokens for tiles up to 256 wide,
    up to 1024 tokens for tiles up to 128 wide) and lost beyond. Every config this
    returns for the benchmark's shapes was timed, and those of the parity grid checked,
    on the H100. (The sweep also found two-warp bitonic programs faster for 256- and
    512-wide tiles at decode sizes; not the default because their numerics were not
    checked on the GPU: the tuner can pick them.)
    """
    width = block_e(experts)
    rows = min(max(1, min(4, 256 // width)), next_power_of_two(max(tokens, 1)))
    bitonic = (width <= 256 and tokens <= 128) or (width <= 128 and tokens <= 1024)
    return {"rows": rows, "num_warps": 1, "select": "bitonic" if bitonic else "twopass"}


def heuristic_tokens_class(tokens: int) -> int:
    """What :func:`heuristic_config` sees of ``tokens``: ceil(log2(tokens)), capped at 11.

    Its thresholds (rows up to 4, bitonic up to 128 or 1024 tokens) are powers of two,
    so two token counts with the same class get the same config; the launcher caches
    launch parameters per class instead of per token count. Keep in step with
    :func:`heuristic_config` when a threshold changes.
    """
    return min((max(tokens, 1) - 1).bit_length(), 11)


def default_for(features: Mapping[str, Any]) -> dict[str, Any]:
    """The config an empty default resolves to for ``features`` (the tuner measures it first)."""
    return heuristic_config(max(1, int(features["tokens"])), int(features["experts"]))
