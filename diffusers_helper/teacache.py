"""TeaCache step skipping for the FramePack transformer, as removable diffusers hooks.

TeaCache (Liu et al., 2024, "Timestep Embedding Tells: It's Time to Cache for Video Diffusion
Model") watches how much the timestep-modulated input of the first transformer block changes
from one model call to the next. The relative L1 change is mapped through a polynomial fitted
to the change of the model output, and summed; while the sum stays under a threshold the
transformer blocks are skipped and the residual they added on the last computed call
(blocks' output minus blocks' input) is added again instead.

The hooks sit on the transformer's blocks only, so embedders, ``norm_out`` and ``proj_out`` run
as usual on every call:

- ``transformer_blocks[0]`` (the head) computes ``norm1(hidden_states, emb=temb)``, advances the
  state and decides; on a skipped call it returns ``hidden_states + previous_residual`` and the
  unchanged ``encoder_hidden_states`` (nothing after the blocks reads the latter);
- every other block passes its inputs through untouched on a skipped call;
- the last block, on a computed call, stores ``previous_residual``.

The decision rule, the polynomial and the per-call counting follow the FramePack reference so
that latents can be compared with it; see ``TeaCache._decide``.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from .hooks import StepCacheBlockHook, check_block_lists, check_steps

__all__ = ["TeaCache", "apply_teacache", "RESCALE_COEFFICIENTS", "DEFAULT_THRESHOLD"]

_HOOK_NAME = "framepack_teacache"

# Polynomial (highest power first) that maps the relative L1 change of the first block's
# modulated input to an estimate of the relative change of the model output. These are the
# values FramePack uses for HunyuanVideo; they are evaluated in float64 with numpy.polyval.
RESCALE_COEFFICIENTS = (733.226126, -401.131952, 67.5869174, -3.14987800, 0.0961237896)

# FramePack's default threshold on the accumulated estimate.
DEFAULT_THRESHOLD = 0.15


def rescale(rel_l1: float) -> float:
    """Evaluate TeaCache's fitted rescaling polynomial (Liu et al., 2024) at one relative L1 change."""
    return float(np.polyval(RESCALE_COEFFICIENTS, rel_l1))


class TeaCache:
    """Handle for TeaCache (Liu et al., 2024) hooks on a FramePack transformer: state, switch and removal."""

    def __init__(self, transformer: torch.nn.Module, num_steps: int, threshold: float) -> None:
        self.transformer = transformer
        self.threshold = float(threshold)
        # When False every hook calls straight through and the state does not advance.
        self.enabled = True
        self._hooked: list[tuple[torch.nn.Module, bool, bool]] = []
        self._head: Optional[torch.nn.Module] = None
        self._removed = False
        self.reset(num_steps)

    # -- state -------------------------------------------------------------------------------

    def reset(self, num_steps: Optional[int] = None) -> None:
        """Start a new TeaCache (Liu et al., 2024) run of ``num_steps`` calls, e.g. one FramePack section."""
        if num_steps is not None:
            self.num_steps = check_steps(num_steps)
        self.cnt = 0
        self.accumulated = 0.0
        self.previous_modulated_input: Optional[torch.Tensor] = None
        self.previous_residual: Optional[torch.Tensor] = None
        self.computed = 0
        self.skipped = 0
        self._skipping = False
        self._hidden_in: Optional[torch.Tensor] = None

    def _decide(self, rel_l1: Optional[float]) -> bool:
        """Advance the counter by one transformer call and return whether to compute the blocks.

        ``rel_l1`` is only read when the call is neither the first nor the last of a run
        (``_needs_rel`` says which); ``None`` there forces a computation. The counter advances
        per transformer *forward call*, not per sampling step: with real CFG (cfg > 1) the
        sampler calls the model twice per step and both calls count, exactly as the FramePack
        reference does, so the "last" call is then reached half-way through the steps. We keep
        that for parity.
        """
        if not self._needs_rel() or rel_l1 is None:
            compute = True
            self.accumulated = 0.0
        else:
            self.accumulated += rescale(rel_l1)
            compute = self.accumulated >= self.threshold
            if compute:
                self.accumulated = 0.0
        self.cnt += 1
        if self.cnt == self.num_steps:
            self.cnt = 0
        return compute

    def _needs_rel(self) -> bool:
        return not (self.cnt == 0 or self.cnt == self.num_steps - 1)

    def _step(self, modulated: torch.Tensor, hidden_states: torch.Tensor) -> bool:
        rel_l1 = None
        previous, residual = self.previous_modulated_input, self.previous_residual
        usable = (
            previous is not None
            and previous.shape == modulated.shape
            and residual is not None
            and residual.shape == hidden_states.shape
        )
        # Without a usable cache (only when the token layout changes without reset()) rel_l1
        # stays None, which forces a computation instead of adding a residual of the wrong shape.
        if self._needs_rel() and usable:
            # Kept in the modulated input's own dtype (bf16 on GPU) and in this exact form so
            # that the rounding, and hence the decisions, match the reference.
            rel_l1 = ((modulated - previous).abs().mean() / previous.abs().mean()).item()
        compute = self._decide(rel_l1)
        self.previous_modulated_input = modulated
        return compute

    # -- hook installation ----------------------------------------------------------------------

    def _install(self) -> None:
        # The head calls norm1 itself, so it must run after any hook that puts the block's
        # weights in place (diffusers group offloading at block level): innermost.
        self._head, self._hooked = _TeaCacheBlockHook.install(self, self.transformer, _HOOK_NAME, innermost_head=True)

    def remove(self) -> None:
        """Remove the TeaCache (Liu et al., 2024) hooks, restoring the transformer's original behaviour."""
        if self._removed:
            return
        self._removed = True
        _TeaCacheBlockHook.uninstall(self, self.transformer, self._hooked, _HOOK_NAME)
        self._hooked = []
        self.previous_modulated_input = self.previous_residual = self._hidden_in = None

    def skips_block(self, block: torch.nn.Module) -> bool:
        """Whether `block` is bypassed on the current call (a skipped step), so its weights are not needed.

        Read by weight streaming at a block's call; the head block decides and is never bypassed.
        """
        return self.enabled and not self._removed and self._skipping and block is not self._head

    @property
    def removed(self) -> bool:
        """Whether this TeaCache (Liu et al., 2024) handle's hooks have been removed (or replaced)."""
        return self._removed

    def __repr__(self) -> str:
        return (
            f"TeaCache(threshold={self.threshold}, num_steps={self.num_steps}, enabled={self.enabled}, "
            f"computed={self.computed}, skipped={self.skipped}, removed={self._removed})"
        )


class _TeaCacheBlockHook(StepCacheBlockHook):
    """Per-block hook: the head decides, the others follow, the tail stores the residual."""

    def _head(self, module, hidden_states, args, kwargs):
        cache = self.cache
        modulated = module.norm1(hidden_states, emb=self._arg("temb", args, kwargs))[0]
        cache._skipping = not cache._step(modulated, hidden_states)
        if cache._skipping:
            cache.skipped += 1
            return cache.previous_residual
        cache.computed += 1
        cache._hidden_in = hidden_states
        return None

    def _tail(self, hidden_out):
        cache = self.cache
        cache.previous_residual = hidden_out - cache._hidden_in
        cache._hidden_in = None


def apply_teacache(transformer: torch.nn.Module, num_steps: int, threshold: float = DEFAULT_THRESHOLD) -> TeaCache:
    """Apply TeaCache (Liu et al., 2024) to a FramePack transformer as removable hooks; replaces any earlier one."""
    check_block_lists(transformer, "TeaCache needs")
    if len(transformer.transformer_blocks) == 0:
        raise ValueError("TeaCache needs at least one double-stream block (it reads transformer_blocks[0].norm1).")
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not threshold >= 0:
        raise ValueError(f"The TeaCache threshold must be a number >= 0, not {threshold!r}.")
    for old in _TeaCacheBlockHook.caches_on(transformer, _HOOK_NAME):
        old.remove()
    cache = TeaCache(transformer, num_steps, threshold)
    cache._install()
    return cache
