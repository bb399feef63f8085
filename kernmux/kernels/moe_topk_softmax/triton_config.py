"""Config space of the Triton kernel, importable without Triton (the registry needs it).

``rows``: tokens per program; ``num_warps``: warps per program; ``select``: "packed" (one
int64 max-reduction per pick) or "twopass" (a max- then a min-reduction per pick).
6 x 4 x 2 = 48 points; :func:`config_valid` prunes those that spill registers, leave
warps idle or cover more rows than the problem has.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

CONFIG_SPACE: dict[str, tuple[Any, ...]] = {
    "rows": (1, 2, 4, 8, 16, 32),
    "num_warps": (1, 2, 4, 8),
    "select": ("packed", "twopass"),
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
    """False for configs that would spill registers, idle warps or overshoot the tokens."""
    width = block_e(int(features["experts"]))
    rows, warps = int(config["rows"]), int(config["num_warps"])
    elems = rows * width
    if elems > _MAX_ELEMS_PER_THREAD * 32 * warps:
        return False
    if elems < 32 * warps:
        return False
    return rows <= next_power_of_two(max(1, int(features["tokens"])))


def heuristic_config(tokens: int, experts: int) -> dict[str, Any]:
    """The untuned default, used for every key a caller's config leaves out.

    About 8 tile elements per thread: one warp up to E = 256, more warps beyond; small
    expert counts put several tokens in one program so each warp has work. Never more
    rows per program than tokens.
    """
    width = block_e(experts)
    warps = max(1, min(8, width // 256))
    rows = max(1, min(16, (warps * 32 * 8) // width))
    rows = min(rows, next_power_of_two(max(tokens, 1)))
    return {"rows": rows, "num_warps": warps, "select": "packed"}
