"""Putting our diffusers ModelHooks on blocks and taking them off again, leaving each block as it was.

Weight streaming (offload.py) and the step caches (teacache.py, magcache.py) hook the transformer's blocks through
diffusers' HookRegistry, possibly on the same blocks, possibly beside hooks of other libraries.
Removing one must leave the others working and, once none of ours is left, the block exactly as
it was before (no registry, no instance `forward`, when it had none).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable

import torch
from diffusers.hooks import HookRegistry, ModelHook


@dataclass(frozen=True)
class HookedBlock:
    """A block we put a hook on, and what it had before: a registry, an instance `forward`."""

    block: torch.nn.Module
    had_registry: bool
    had_forward: bool


def add_hook(block: torch.nn.Module, hook: ModelHook, name: str, *, innermost: bool = False) -> HookedBlock:
    """Register `hook` on `block` under `name`, outermost (diffusers' order) or innermost."""
    hooked = HookedBlock(block, hasattr(block, "_diffusers_hook"), "forward" in vars(block))
    registry = HookRegistry.check_if_exists_or_initialize(block)
    if innermost:
        # HookRegistry wraps each new hook around the ones before it; to go inside the existing
        # hooks we take them off, register ours, and put them back in their original order.
        others = list(registry.hooks.items())
        for other_name, _ in reversed(others):
            registry.remove_hook(other_name, recurse=False)
        registry.register_hook(hook, name)
        for other_name, other in others:
            registry.register_hook(other, other_name)
    else:
        registry.register_hook(hook, name)
    return hooked


def remove_hook(hooked: HookedBlock, name: str, mine: Callable[[ModelHook], bool] = lambda hook: True) -> None:
    """Take the hook `name` off the block if `mine(hook)`; drop the registry if it was ours alone."""
    block = hooked.block
    registry = getattr(block, "_diffusers_hook", None)
    if registry is None:
        return
    hook = registry.get_hook(name)
    if hook is None or not mine(hook):
        return
    names = list(registry.hooks)
    outer = [(n, registry.hooks[n]) for n in names[names.index(name) + 1:]]
    if any(hasattr(h, "new_forward") for _, h in outer):
        # HookRegistry.remove_hook relinks the next hook's `forward`, which for a hook with its
        # own new_forward would drop that hook; take the outer hooks off and put them back.
        for other_name, _ in reversed(outer):
            registry.remove_hook(other_name, recurse=False)
        registry.remove_hook(name, recurse=False)
        for other_name, other in outer:
            registry.register_hook(other, other_name)
    else:
        registry.remove_hook(name, recurse=False)
    if not registry.hooks and not hooked.had_registry:
        del block._diffusers_hook
        if not hooked.had_forward and "forward" in vars(block):
            del block.forward


def invalidate_registry_caches(module: torch.nn.Module) -> None:
    """Make a model's registry see hooks added to or removed from its children."""
    registry = getattr(module, "_diffusers_hook", None)
    if registry is not None:
        registry.invalidate_child_registries_cache()


class StepCacheBlockHook(ModelHook):
    """Base of the step caches' per-block hooks (TeaCache, MagCache): the head decides, the others follow,
    the tail stores the residual. Subclasses say how the head decides (`_head`) and what the tail keeps (`_tail`)."""

    _is_stateful = True

    def __init__(self, cache: Any, is_head: bool, is_tail: bool) -> None:
        super().__init__()
        self.cache = cache
        self.is_head = is_head
        self.is_tail = is_tail
        self._names: tuple[str, ...] = ()

    def initialize_hook(self, module: torch.nn.Module) -> torch.nn.Module:
        params = inspect.signature(type(module).forward).parameters
        self._names = tuple(name for name in params if name != "self")
        return module

    def reset_state(self, module: torch.nn.Module) -> torch.nn.Module:
        if self.is_head:
            self.cache.reset()
        return module

    def _arg(self, name: str, args: tuple, kwargs: dict) -> Any:
        """A forward argument by name, whether it was passed by keyword or by position."""
        return kwargs[name] if name in kwargs else args[self._names.index(name)]

    def new_forward(self, module: torch.nn.Module, *args, **kwargs):
        cache = self.cache
        if not cache.enabled:
            return self.fn_ref.original_forward(*args, **kwargs)
        if self.is_head:
            hidden_states = self._arg("hidden_states", args, kwargs)
            residual = self._head(module, hidden_states, args, kwargs)
            if residual is not None:  # a skipped call: the blocks' output is their input plus the residual
                return hidden_states + residual, self._arg("encoder_hidden_states", args, kwargs)
        elif cache._skipping:
            return self._arg("hidden_states", args, kwargs), self._arg("encoder_hidden_states", args, kwargs)
        output = self.fn_ref.original_forward(*args, **kwargs)
        if self.is_tail:
            self._tail(output[0])
        return output

    def _head(self, module: torch.nn.Module, hidden_states: torch.Tensor, args: tuple, kwargs: dict):
        """Decide this call at the head block: the residual to add when the blocks are skipped, else None (and
        the blocks' input is kept for `_tail`). The blocks never write into their input, so a reference is enough."""
        raise NotImplementedError

    def _tail(self, hidden_out: torch.Tensor) -> None:
        """Keep what a computed call's blocks added (their output minus the input `_head` kept)."""
        raise NotImplementedError

    # -- one hook per block, for a whole cache ---------------------------------------------------

    @classmethod
    def install(cls, cache: Any, transformer: torch.nn.Module, name: str, *,
                innermost_head: bool = False) -> tuple[torch.nn.Module, list[HookedBlock]]:
        """Put a hook of this class for `cache` on each of the transformer's blocks, double-stream then
        single-stream (the first is the head, the last the tail); returns (head, what was hooked)."""
        blocks = cache_blocks(transformer)
        head, tail = blocks[0], blocks[-1]
        hooked = [add_hook(block, cls(cache, is_head=block is head, is_tail=block is tail), name,
                           innermost=innermost_head and block is head) for block in blocks]
        invalidate_registry_caches(transformer)
        return head, hooked

    @classmethod
    def uninstall(cls, cache: Any, transformer: torch.nn.Module, hooked: list[HookedBlock], name: str) -> None:
        """Take `cache`'s hooks of this class off the blocks `install` hooked (other hooks stay)."""
        for block in hooked:
            remove_hook(block, name, mine=lambda hook: isinstance(hook, cls) and hook.cache is cache)
        invalidate_registry_caches(transformer)

    @classmethod
    def caches_on(cls, transformer: torch.nn.Module, name: str) -> list:
        """The caches that have hooks of this class on the transformer's blocks (to replace them)."""
        found = []
        for block in cache_blocks(transformer):
            registry = getattr(block, "_diffusers_hook", None)
            hook = registry.get_hook(name) if registry is not None else None
            if isinstance(hook, cls) and hook.cache not in found:
                found.append(hook.cache)
        return found


BLOCK_LISTS = ("transformer_blocks", "single_transformer_blocks")


def check_block_lists(transformer: torch.nn.Module, needs: str) -> None:
    """ValueError unless the transformer has HunyuanVideo's two lists of blocks; `needs` begins the message
    ("TeaCache needs")."""
    for name in BLOCK_LISTS:
        if not isinstance(getattr(transformer, name, None), torch.nn.ModuleList):
            raise ValueError(f"{needs} a HunyuanVideo-style transformer with `{name}`.")


def check_steps(steps: Any, name: str = "num_steps") -> int:
    """`steps` if it is a positive integer (not a bool), else ValueError naming it."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"{name} must be a positive integer, not {steps!r}.")
    return steps


def cache_blocks(transformer: torch.nn.Module) -> list[torch.nn.Module]:
    """A HunyuanVideo-style transformer's blocks in call order: double-stream, then single-stream."""
    return list(transformer.transformer_blocks) + list(transformer.single_transformer_blocks)
