"""Key-cache layouts of the DSA indexer and zero-copy conversions between them.

The op takes the paged key cache as two tensors (any strides):

- ``k_cache``: fp8 e4m3 ``[num_blocks, block_size, head_dim]``
- ``k_scale``: fp32 ``[num_blocks, block_size]``, the dequantisation scale of each token

Inference engines keep the indexer cache as one uint8 buffer instead. Two fused
layouts exist:

- **page** (DeepGEMM ``fp8_paged_mqa_logits``, vLLM's indexer cache, AITER main):
  per page ``block_size * head_dim`` fp8 bytes of all tokens, then ``block_size`` fp32
  scales; viewed as ``[num_blocks, block_size, 1, head_dim + 4]`` uint8.
- **token**: per token ``head_dim`` fp8 bytes then its 4-byte fp32 scale; what older
  AITER kernels slice with ``kv[..., :head_dim]`` (identical to *page* when
  ``block_size == 1``).

:func:`split_page_layout` / :func:`split_token_layout` give the op's two tensors as
views of a fused buffer (no copy), and :func:`page_layout_base` /
:func:`token_layout_base` recover the fused buffer from such views so a library that
wants the fused layout gets it without a copy. :func:`fuse_page_layout` /
:func:`fuse_token_layout` build a fused copy from arbitrary tensors.
"""

from __future__ import annotations

import torch

FP8 = torch.float8_e4m3fn


def _check_fused(fused: torch.Tensor) -> None:
    if fused.dtype != torch.uint8 or not fused.is_contiguous() or fused.dim() < 3:
        raise ValueError(
            "fused cache must be contiguous uint8 [num_blocks, block_size, (1,) head_dim + 4], "
            f"got {fused.dtype} {tuple(fused.shape)} contiguous={fused.is_contiguous()}"
        )


def split_page_layout(fused: torch.Tensor, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Views ``(k_cache fp8 [nb, bs, D], k_scale fp32 [nb, bs])`` of a page-fused buffer.

    fused: uint8 ``[num_blocks, block_size, 1, head_dim + 4]`` (or ``[nb, bs, D + 4]``),
    contiguous. No data is copied.
    """
    _check_fused(fused)
    num_blocks, block_size = fused.shape[0], fused.shape[1]
    if fused[0].numel() != block_size * (head_dim + 4):
        raise ValueError(f"fused cache page holds {fused[0].numel()} bytes, expected block_size*(head_dim+4) = {block_size * (head_dim + 4)}")
    flat = fused.view(num_blocks, block_size * (head_dim + 4))
    k_cache = flat[:, : block_size * head_dim].view(FP8).view(num_blocks, block_size, head_dim)
    k_scale = flat[:, block_size * head_dim :].view(torch.float32)
    return k_cache, k_scale


def split_token_layout(fused: torch.Tensor, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Views ``(k_cache, k_scale)`` of a token-fused buffer ``[nb, bs, ..., head_dim + 4]``."""
    _check_fused(fused)
    num_blocks, block_size = fused.shape[0], fused.shape[1]
    if fused[0].numel() != block_size * (head_dim + 4):
        raise ValueError(f"fused cache page holds {fused[0].numel()} bytes, expected block_size*(head_dim+4) = {block_size * (head_dim + 4)}")
    rows = fused.view(num_blocks, block_size, head_dim + 4)
    k_cache = rows[..., :head_dim].view(FP8)
    k_scale = rows[..., head_dim:].view(torch.float32).squeeze(-1)
    return k_cache, k_scale


def fuse_page_layout(k_cache: torch.Tensor, k_scale: torch.Tensor) -> torch.Tensor:
    """A page-fused copy: uint8 ``[num_blocks, block_size, 1, head_dim + 4]``."""
    num_blocks, block_size, head_dim = k_cache.shape
    fused = torch.empty((num_blocks, block_size * (head_dim + 4)), dtype=torch.uint8, device=k_cache.device)
    fused[:, : block_size * head_dim] = k_cache.contiguous().view(torch.uint8).view(num_blocks, -1)
    fused[:, block_size * head_dim :] = k_scale.to(torch.float32).contiguous().view(torch.uint8).view(num_blocks, -1)
    return fused.view(num_blocks, block_size, 1, head_dim + 4)


def fuse_token_layout(k_cache: torch.Tensor, k_scale: torch.Tensor) -> torch.Tensor:
    """A token-fused copy: uint8 ``[num_blocks * block_size, 1, 1, head_dim + 4]``
    (token ``t = page * block_size + slot``)."""
    num_blocks, block_size, head_dim = k_cache.shape
    tokens = num_blocks * block_size
    fused = torch.empty((tokens, head_dim + 4), dtype=torch.uint8, device=k_cache.device)
    fused[:, :head_dim] = k_cache.reshape(tokens, head_dim).view(torch.uint8)
    fused[:, head_dim:] = k_scale.to(torch.float32).reshape(tokens, 1).view(torch.uint8)
    return fused.view(tokens, 1, 1, head_dim + 4)


def _byte_offset(t: torch.Tensor) -> int:
    return t.storage_offset() * t.element_size()


def _same_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def _strides_are(t: torch.Tensor, strides: tuple[int, ...]) -> bool:
    # The stride of a dimension of size 1 is never used, so it may be anything.
    return all(size == 1 or got == want for size, got, want in zip(t.shape, t.stride(), strides))


def _uint8_view(t: torch.Tensor, shape: tuple[int, ...], strides: tuple[int, ...], offset: int) -> torch.Tensor:
    storage = torch.empty(0, dtype=torch.uint8, device=t.device).set_(t.untyped_storage())
    return storage.as_strided(shape, strides, offset)


def page_layout_base(k_cache: torch.Tensor, k_scale: torch.Tensor) -> torch.Tensor | None:
    """The page-fused uint8 ``[nb, bs, 1, D + 4]`` buffer that ``k_cache`` and
    ``k_scale`` are views of, or None when they are not such views."""
    num_blocks, block_size, head_dim = k_cache.shape
    page = block_size * (head_dim + 4)
    if not _same_storage(k_cache, k_scale) or k_cache.dtype != FP8 or k_scale.dtype != torch.float32:
        return None
    if not _strides_are(k_cache, (page, head_dim, 1)) or not _strides_are(k_scale, (page // 4, 1)):
        return None
    base = _byte_offset(k_cache)
    if _byte_offset(k_scale) != base + block_size * head_dim:
        return None
    return _uint8_view(k_cache, (num_blocks, block_size, 1, head_dim + 4), (page, head_dim + 4, head_dim + 4, 1), base)


def token_layout_base(k_cache: torch.Tensor, k_scale: torch.Tensor) -> torch.Tensor | None:
    """The token-fused uint8 ``[nb * bs, 1, 1, D + 4]`` buffer that ``k_cache`` and
    ``k_scale`` are views of, or None. With ``block_size == 1`` a page-fused buffer is
    also token-fused."""
    num_blocks, block_size, head_dim = k_cache.shape
    row = head_dim + 4
    if not _same_storage(k_cache, k_scale) or k_cache.dtype != FP8 or k_scale.dtype != torch.float32:
        return None
    if not _strides_are(k_cache, (block_size * row, row, 1)) or not _strides_are(k_scale, (block_size * row // 4, row // 4)):
        return None
    base = _byte_offset(k_cache)
    if _byte_offset(k_scale) != base + head_dim:
        return None
    return _uint8_view(k_cache, (num_blocks * block_size, 1, 1, row), (row, row, row, 1), base)
