"""Multi-block masking for I-JEPA (the paper's context and target blocks), vectorised over the batch.

Per batch, one target block size and one context block size are drawn (scale and aspect
ratio each from its OWN uniform draw), so every image's target lists have the same length
and stack without truncation. Per image, `npred` target blocks and `nenc` context blocks are
placed at independent uniform positions over the full valid range (top in [0, H-h],
left in [0, W-w], both inclusive: the last row and column are reachable). Unless
`allow_overlap`, every target patch is removed from each context block. A context block
must keep at least `min_keep` patches; images that fail are re-placed (only those rows,
at most `max_tries` rounds); a block size that cannot work at all, or that keeps failing,
is re-drawn for the batch (at most `max_size_draws` times); after that a `MaskSamplingError`
names the parameters and the grid. Nothing loops unboundedly.

Context lists are cut to the batch's shortest length by keeping a uniformly RANDOM subset
of each image's context patches (then sorted), never the first ones, so truncation does not
favour any region of the image.

Indices are row-major patch positions in the grid: ``r * W + c``.

Randomness comes only from the `torch.Generator` passed to `MaskGenerator.__call__`: the
training loop seeds it from ``(seed, step)`` (`make_generator`, from ijepa.seeding and
re-exported here) and resumes exactly without saved state.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass, replace
from typing import Any, Literal, Sequence

import torch

from ijepa.config import ConfigError, require
from ijepa.seeding import derive_seed, make_generator  # re-exported: the trainer imports them from here

__all__ = [
    "MaskConfig", "Masks", "BlockMasks", "MaskGenerator", "MaskSamplingError",
    "derive_seed", "make_generator", "block_shape",
]


class MaskSamplingError(RuntimeError):
    """No valid masks were found for a batch within the bounded number of retries."""


@dataclass(frozen=True)
class MaskConfig:
    """Multi-block mask parameters (paper values by default; I-JEPA ViT-H/14 config).

    scale: fraction of the grid's patches a block covers; aspect: block height / width.
    min_keep: least number of patches each context block keeps after removing targets.
    max_tries: rounds of re-placing the images whose context is too small, per size draw.
    max_size_draws: how many times a batch's block sizes may be drawn before giving up.
    """

    npred: int = 4
    pred_scale: tuple[float, float] = (0.15, 0.2)
    pred_aspect: tuple[float, float] = (0.75, 1.5)
    nenc: int = 1
    enc_scale: tuple[float, float] = (0.85, 1.0)
    enc_aspect: tuple[float, float] = (1.0, 1.0)
    min_keep: int = 10
    allow_overlap: bool = False
    max_tries: int = 50
    max_size_draws: int = 10
    # "truncate": cut every context list to the batch's shortest (paper / reference code);
    # "pad": keep every context patch, pad lists to the longest and mask the padding out of
    # attention (Masks.context_valid) — on small grids the cut throws most context away.
    context_policy: Literal["truncate", "pad"] = "truncate"

    def validate(self) -> None:
        for name in ("npred", "nenc", "min_keep", "max_tries", "max_size_draws"):
            v = getattr(self, name)
            require(isinstance(v, int) and not isinstance(v, bool) and v >= 1,
                    f"{name} must be an integer >= 1, got {v!r}")
        for name in ("pred_scale", "enc_scale"):
            v = getattr(self, name)
            require(len(v) == 2 and all(math.isfinite(x) for x in v) and 0.0 < v[0] <= v[1] <= 1.0,
                    f"{name} must satisfy 0 < min <= max <= 1, got {tuple(v)!r}")
        for name in ("pred_aspect", "enc_aspect"):
            v = getattr(self, name)
            require(len(v) == 2 and all(math.isfinite(x) for x in v) and 0.0 < v[0] <= v[1],
                    f"{name} must satisfy 0 < min <= max, got {tuple(v)!r}")
        require(isinstance(self.allow_overlap, bool),
                f"allow_overlap must be true/false, got {self.allow_overlap!r}")


def block_shape(scale: float, aspect: float, grid: tuple[int, int]) -> tuple[int, int]:
    """(h, w) of a block covering `scale` of the grid with h/w ~ `aspect`, clipped to fit."""
    H, W = grid
    area = scale * H * W
    h = int(math.floor(math.sqrt(area * aspect) + 0.5))
    w = int(math.floor(math.sqrt(area / aspect) + 0.5))
    return min(max(h, 1), H), min(max(w, 1), W)


def _to(t: torch.Tensor, device, non_blocking: bool) -> torch.Tensor:
    return t.to(device, non_blocking=non_blocking)


@dataclass(frozen=True, eq=False)
class Masks:
    """One batch of masks.

    context: LongTensor [nenc, B, Nc], sorted patch indices kept by each context block.
    targets: LongTensor [npred, B, Nt], patch indices of each target block (Nt = h*w,
        row-major inside the block, hence sorted).
    grid: (H, W) of the patch grid; target_hw / context_hw: the block sizes drawn for
        this batch; context_counts: LongTensor [nenc, B], context sizes BEFORE the cut to
        Nc (for logging how much truncation costs).
    """

    context: torch.Tensor
    targets: torch.Tensor
    grid: tuple[int, int]
    target_hw: tuple[int, int]
    context_hw: tuple[int, int]
    context_counts: torch.Tensor
    context_valid: torch.Tensor | None = None  # Bool [nenc, B, Nc] when lists were padded

    def to(self, device, non_blocking: bool = False) -> "Masks":
        valid = None if self.context_valid is None else _to(self.context_valid, device, non_blocking)
        return replace(self, context=_to(self.context, device, non_blocking),
                       targets=_to(self.targets, device, non_blocking),
                       context_counts=_to(self.context_counts, device, non_blocking),
                       context_valid=valid)

    def pin_memory(self) -> "Masks":  # DataLoader(pin_memory=True) calls this
        valid = None if self.context_valid is None else self.context_valid.pin_memory()
        return replace(self, context=self.context.pin_memory(), targets=self.targets.pin_memory(),
                       context_counts=self.context_counts.pin_memory(), context_valid=valid)

    @property
    def batch_size(self) -> int:
        return self.context.shape[1]


@dataclass(frozen=True, eq=False)
class BlockMasks:
    """Masks before the context cut: context_mask BoolTensor [nenc, B, H*W]."""

    context_mask: torch.Tensor
    targets: torch.Tensor
    grid: tuple[int, int]
    target_hw: tuple[int, int]
    context_hw: tuple[int, int]


def _is_int(x: Any) -> bool:
    try:
        operator.index(x)
    except TypeError:
        return False
    return not isinstance(x, bool)


def _lattice(lo: float, hi: float, n: int = 65) -> list[float]:
    if hi <= lo:
        return [lo]
    return [lo + (hi - lo) * i / (n - 1) for i in range(n)]


class MaskGenerator:
    """Draws multi-block masks for a `grid` = (H, W) patch grid; see the module docstring.

    Building it checks the grid against the config (raises ConfigError naming the
    parameters and the grid when no draw of block sizes could ever satisfy `min_keep`).
    """

    def __init__(self, cfg: MaskConfig, grid: tuple[int, int] | Sequence[int]):
        if not isinstance(cfg, MaskConfig):
            raise ConfigError(f"MaskGenerator: expected a MaskConfig, got {type(cfg).__name__}")
        cfg.validate()
        grid = tuple(grid)
        require(len(grid) == 2 and all(_is_int(x) and int(x) >= 1 for x in grid),
                f"grid must be two positive integers (H, W), got {grid!r}")
        self.cfg = cfg
        self.grid: tuple[int, int] = (int(grid[0]), int(grid[1]))
        H, W = self.grid
        self.num_patches = H * W
        where = f"grid {H}x{W} ({H * W} patches)"
        require(cfg.min_keep <= H * W,
                f"min_keep={cfg.min_keep} exceeds the {where}; lower min_keep")
        # Achievable integer block sizes (dense lattice over the scale x aspect boxes).
        self._pred_shapes = sorted({block_shape(s, a, self.grid) for s in _lattice(*cfg.pred_scale)
                                    for a in _lattice(*cfg.pred_aspect)})
        self._enc_shapes = sorted({block_shape(s, a, self.grid) for s in _lattice(*cfg.enc_scale)
                                   for a in _lattice(*cfg.enc_aspect)})
        best = max(self._best_context(p, e) for p in self._pred_shapes for e in self._enc_shapes)
        require(best >= cfg.min_keep,
                f"min_keep={cfg.min_keep} can never be met on the {where}: with "
                f"enc_scale={cfg.enc_scale}, enc_aspect={cfg.enc_aspect}, pred_scale={cfg.pred_scale}, "
                f"pred_aspect={cfg.pred_aspect}, allow_overlap={cfg.allow_overlap} a context block "
                f"keeps at most {best} patches; lower min_keep or raise enc_scale / lower pred_scale")
        self._rows = torch.arange(H)
        self._cols = torch.arange(W)

    def _best_context(self, pred_hw: tuple[int, int], enc_hw: tuple[int, int]) -> int:
        """Most patches a context block can keep for these sizes (targets stacked in the
        corner opposite the context block)."""
        (h, w), (hc, wc) = pred_hw, enc_hw
        H, W = self.grid
        if self.cfg.allow_overlap:
            return hc * wc
        return hc * wc - max(0, h + hc - H) * max(0, w + wc - W)

    def __repr__(self) -> str:
        return f"MaskGenerator(grid={self.grid}, cfg={self.cfg})"

    # -- drawing ---------------------------------------------------------------------------
    def _draw_shape(self, scale: tuple[float, float], aspect: tuple[float, float],
                    g: torch.Generator) -> tuple[int, int]:
        u = torch.rand(2, generator=g, dtype=torch.float64).tolist()  # independent draws
        s = scale[0] + (scale[1] - scale[0]) * u[0]
        a = aspect[0] + (aspect[1] - aspect[0]) * u[1]
        return block_shape(s, a, self.grid)

    def _place(self, n: int, rows: int, hw: tuple[int, int], g: torch.Generator):
        """Top/left [n, rows] uniform over the inclusive valid range, and the boolean block
        masks [n, rows, H*W]."""
        H, W = self.grid
        h, w = hw
        top = torch.randint(0, H - h + 1, (n, rows), generator=g)
        left = torch.randint(0, W - w + 1, (n, rows), generator=g)
        in_r = (self._rows >= top[..., None]) & (self._rows < top[..., None] + h)
        in_c = (self._cols >= left[..., None]) & (self._cols < left[..., None] + w)
        mask = (in_r[..., :, None] & in_c[..., None, :]).reshape(n, rows, H * W)
        return top, left, mask

    def _context(self, tgt_mask: torch.Tensor, enc_mask: torch.Tensor) -> torch.Tensor:
        if self.cfg.allow_overlap:
            return enc_mask
        return enc_mask & ~tgt_mask.any(0)[None]

    def sample_blocks(self, batch_size: int, generator: torch.Generator) -> BlockMasks:
        """Masks before the context cut (context as a boolean mask per block)."""
        cfg = self.cfg
        if not (_is_int(batch_size) and int(batch_size) >= 1):
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        g = generator
        B = int(batch_size)
        for _ in range(cfg.max_size_draws):
            p_hw = self._draw_shape(cfg.pred_scale, cfg.pred_aspect, g)
            e_hw = self._draw_shape(cfg.enc_scale, cfg.enc_aspect, g)
            if self._best_context(p_hw, e_hw) < cfg.min_keep:
                continue  # these sizes can never work: re-draw them
            t_top, t_left, t_mask = self._place(cfg.npred, B, p_hw, g)
            _, _, e_mask = self._place(cfg.nenc, B, e_hw, g)
            ctx = self._context(t_mask, e_mask)
            bad = (ctx.sum(-1) < cfg.min_keep).any(0)
            for _ in range(cfg.max_tries):
                if not bool(bad.any()):
                    break
                rows = bad.nonzero().squeeze(1)
                nt, nl, nm = self._place(cfg.npred, rows.numel(), p_hw, g)
                _, _, em = self._place(cfg.nenc, rows.numel(), e_hw, g)
                t_top[:, rows], t_left[:, rows] = nt, nl
                ctx[:, rows] = self._context(nm, em)
                bad[rows] = (ctx[:, rows].sum(-1) < cfg.min_keep).any(0)
            if bool(bad.any()):
                continue  # give up on these sizes for this batch
            H, W = self.grid
            h, w = p_hw
            r = (t_top[..., None, None] + torch.arange(h)[:, None]) * W
            c = t_left[..., None, None] + torch.arange(w)[None, :]
            targets = (r + c).reshape(cfg.npred, B, h * w)
            return BlockMasks(ctx, targets, self.grid, p_hw, e_hw)
        H, W = self.grid
        raise MaskSamplingError(
            f"no valid masks for a batch of {B} on grid {H}x{W} after {cfg.max_size_draws} block-size "
            f"draws x {cfg.max_tries} tries: min_keep={cfg.min_keep}, npred={cfg.npred}, "
            f"pred_scale={cfg.pred_scale}, pred_aspect={cfg.pred_aspect}, nenc={cfg.nenc}, "
            f"enc_scale={cfg.enc_scale}, enc_aspect={cfg.enc_aspect}, allow_overlap={cfg.allow_overlap}; "
            f"lower min_keep or pred_scale / npred, or raise enc_scale")

    @staticmethod
    def truncate(blocks: BlockMasks, generator: torch.Generator) -> Masks:
        """Cut every context list to the batch's shortest by a uniformly random subset."""
        m = blocks.context_mask
        counts = m.sum(-1)
        nc = int(counts.min())
        keys = torch.rand(m.shape, generator=generator)
        keys.masked_fill_(~m, 2.0)  # never chosen before a real context patch
        kept = keys.topk(nc, dim=-1, largest=False, sorted=False).indices.sort(-1).values
        return Masks(context=kept, targets=blocks.targets, grid=blocks.grid,
                     target_hw=blocks.target_hw, context_hw=blocks.context_hw,
                     context_counts=counts)

    @staticmethod
    def pad(blocks: BlockMasks) -> Masks:
        """Keep every context patch: lists padded to the batch's longest, `context_valid`
        marks the real entries (valid first, in position order; padding after)."""
        m = blocks.context_mask
        counts = m.sum(-1)
        nc = int(counts.max())
        n = m.shape[-1]
        pos = torch.arange(n).expand_as(m)
        order = torch.where(m, pos, pos + n).argsort(dim=-1)[..., :nc]
        return Masks(context=order, targets=blocks.targets, grid=blocks.grid,
                     target_hw=blocks.target_hw, context_hw=blocks.context_hw,
                     context_counts=counts, context_valid=m.gather(-1, order))

    def __call__(self, batch_size: int, generator: torch.Generator) -> Masks:
        blocks = self.sample_blocks(batch_size, generator)
        if self.cfg.context_policy == "pad":
            return self.pad(blocks)
        return self.truncate(blocks, generator)
