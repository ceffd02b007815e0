"""Opening a model set for jobs: device, attention kernel, sources, loading and placement, in one place.

The command line, the app's job queue and both benchmarks all run jobs through a `Runtime`:

    runtime = Runtime(sources, device="auto", vram="auto", attention="auto")
    runtime.check(model)                      # cheap: device, attention kernel, model files present
    for event in runtime.generate(settings, image, output): ...

It loads the shared components (text encoders, VAE, image encoder) once, and one transformer at a
time: asking for the other variant releases the loaded one first, since two rarely fit in memory.
The attention kernel is set on each transformer as it loads, and the VRAM mode (`Placement`) is
chosen at the first job from the free GPU memory then.

Importing this module does no work.
"""

from __future__ import annotations

import dataclasses
import threading
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Union

import torch

from .events import CancelToken, Event
from .settings import GenerationSettings, ModelSources

SourcesLike = Union[ModelSources, Callable[[], ModelSources]]


class Runtime:
    """Loaded components for jobs on one device, and where they live while a job runs."""

    def __init__(self, sources: SourcesLike, *, device: str | torch.device = "auto", vram: str = "auto",
                 attention: str = "auto", load_shared: Optional[Callable] = None,
                 load_transformer: Optional[Callable] = None, compile: bool = False,
                 lora_dir: Optional[Path | str] = None, **placement_options: Any):
        from .attention import resolve_attention
        from .loading import resolve_device

        self.device = resolve_device(device)
        # an unknown or unavailable kernel is refused now, before anything loads
        self.attention = resolve_attention(attention, self.device)
        if compile:  # a platform that can't compile is refused now too (compiled.CompileUnavailable)
            from .compiled import check_compile

            check_compile(self.device)
        self.compile = bool(compile)
        self._attention_choice = attention
        self.vram = vram
        self._sources = sources
        self._load_shared = load_shared
        self._load_transformer = load_transformer
        self._placement_options = placement_options
        self._placement = None
        self._lock = threading.Lock()
        self._shared = None
        self._transformer = None
        self._model: Optional[str] = None
        self._fp8 = False  # whether the loaded transformer's weights are stored in fp8
        # LoRAs: where a recorded job's LoRAs are looked for by name, and the ones in the transformer
        self._loras = None
        self._lora_targets: dict[str, dict] = {}  # transformer source -> its layers a LoRA may change
        self.lora_dir = lora_dir
        # where jobs run when that is not simply this process (a Ray worker: node and actor); in each sidecar
        self.worker: Optional[dict[str, Any]] = None

    # -- what it runs on ------------------------------------------------------------------------

    def sources(self) -> ModelSources:
        """The sources, resolved once (building the tiny models, for instance, happens on first use)."""
        if callable(self._sources):
            self._sources = self._sources()
        return self._sources

    def check(self, model: str, loras: tuple = ()) -> None:
        """Confirm that every file `model` needs is there (SourceError lists what is missing), and that
        each of `loras` ((path, weight) pairs) fits its transformer (LoraError names the first bad key)."""
        from .loading import check_sources

        check_sources(self.sources(), model)
        if loras:
            self.check_loras(model, loras)

    def check_loras(self, model: str, loras: tuple) -> None:
        """Read each LoRA's header and map it onto `model`'s transformer, loaded or not (no weights are read)."""
        from .lora import lora_targets

        if not loras:
            return
        # from a weightless copy built from the configuration: the loaded transformer may be changing
        # (a job applying its LoRAs on the worker thread) while a page checks the next job's
        source = self.sources().transformer(model)
        if source not in self._lora_targets:
            from diffusers import HunyuanVideoFramepackTransformer3DModel

            from .loading import transformer_config

            with torch.device("meta"):
                meta = HunyuanVideoFramepackTransformer3DModel.from_config(transformer_config(source))
            self._lora_targets[source] = lora_targets(meta)
        self.lora_manager.check(loras, self._lora_targets[source])

    @property
    def lora_manager(self):
        """The LoRAs in the loaded transformer and the files' SHA-256 sums (lora.LoraManager)."""
        if self._loras is None:
            from .lora import LoraManager

            self._loras = LoraManager(self.lora_dir)
        return self._loras

    @property
    def lora_dir(self) -> Optional[Path]:
        """The LoRA folder: bare file names are looked for there first, and a resumed job's LoRAs by name."""
        return self._lora_dir

    @lora_dir.setter
    def lora_dir(self, folder: Optional[Path | str]) -> None:
        self._lora_dir = Path(folder).expanduser() if folder else None
        if self._loras is not None:
            self._loras.lora_dir = self._lora_dir

    @property
    def placement(self):
        """Where models live for a job (memory.Placement); the VRAM mode is chosen on first use."""
        if self._placement is None:
            from .memory import Placement, choose_vram_mode

            self._placement = Placement(self.device, choose_vram_mode(self.vram, self.device), **self._placement_options)
        return self._placement

    @placement.setter
    def placement(self, placement) -> None:
        self._placement = placement

    @property
    def loaded_model(self) -> Optional[str]:
        """The variant whose transformer is loaded, if any."""
        return self._model

    def record(self, model: str, loras: tuple = ()) -> dict[str, Any]:
        """What a job's sidecar says about where it ran: model sources, device, VRAM mode; its LoRAs by
        file name and SHA-256."""
        sources = self.sources()
        record = {
            "sources": {"hunyuan": str(sources.hunyuan), "siglip": str(sources.siglip),
                        "transformer": str(sources.transformer(model))},
            "device": str(self.device),
            "vram_mode": self.placement.mode.value,
        }
        if sources.vae:
            record["sources"]["vae"] = str(sources.vae)
        if loras:
            record["loras"] = self.lora_manager.record(loras)
        if self.worker:
            record["worker"] = dict(self.worker)
        return record

    # -- loading --------------------------------------------------------------------------------

    def components(self, model: str, notify: Callable[[str], None] = lambda message: None,
                   cancel: Optional[CancelToken] = None, *, fp8: bool = False):
        """Components for `model` (its transformer's weights in fp8 if `fp8`), loading what is missing;
        `notify` hears what is being loaded."""
        from .loading import Components, component_dtypes, load_shared, load_transformer
        from .variants import display_name

        load_shared = self._load_shared or load_shared
        load_transformer = self._load_transformer or load_transformer
        with self._lock:
            if self._shared is None:
                notify("Getting the model files ready (first use)")
                sources = self.sources()
                notify("Loading the text encoders, VAE and image encoder (first use)")
                self._shared = load_shared(sources, self.device)
            if cancel is not None:
                cancel.check()
            if (self._model, self._fp8) != (model, fp8):
                if self._transformer is not None:
                    # Release the other variant first: two transformers rarely fit in memory.
                    notify(f"Unloading the {display_name(self._model)} transformer")
                    self._transformer, self._model = None, None
                    self.lora_manager.forget()
                    from .memory import empty_cache

                    empty_cache(self.device)
                notify(f"Loading the {display_name(model)} transformer")
                from .attention import set_attention

                transformer = load_transformer(self.sources().transformer(model), self.device)
                set_attention(transformer, self._attention_choice, self.device)
                self._prepare(transformer, fp8, notify)
                self._transformer, self._model, self._fp8 = transformer, model, fp8
            return Components(shared=self._shared, transformer=self._transformer, model=model,
                              device=self.device, dtypes=component_dtypes(self.device))

    def _prepare(self, transformer, fp8: bool, notify: Callable[[str], None]) -> None:
        """fp8 weight storage and compiled blocks, as asked; compiling comes before any hook goes on a block."""
        if fp8:
            from .fp8 import apply_fp8

            notify("Storing the transformer's attention and MLP weights in fp8")
            apply_fp8(transformer)
        if self.compile:
            from .compiled import compile_blocks

            notify("Compiling the transformer's blocks (at the first step)")
            compile_blocks(transformer)

    def apply_loras(self, loras: tuple, notify: Callable[[str], None] = lambda message: None) -> list[str]:
        """Make the loaded transformer carry exactly `loras` ((path, weight) pairs; none: as loaded).

        Only LoRA files not applied yet are read; the base weights are never reloaded. Returns
        what the user should know (keys that were skipped).
        """
        from .loading import component_dtypes

        with self._lock:
            if self._transformer is None:
                raise RuntimeError("no transformer is loaded")
            return self.lora_manager.apply(self._transformer, loras, component_dtypes(self.device)["transformer"],
                                           notify=notify)

    def resume_loras(self, state):
        """A resumed job's state with its LoRAs where the very same files are now (recorded path, else
        lora_dir); LoraError says which one is missing or changed."""
        from .lora import recorded_loras

        loras = state.settings.loras
        if not loras:
            return state
        folders = [self.lora_dir] if self.lora_dir is not None else []
        found = recorded_loras(loras, state.record.get("loras") or [], folders, self.lora_manager)
        return dataclasses.replace(state, settings=state.settings.replace(loras=found)) if found != loras else state

    # -- jobs -------------------------------------------------------------------------------------

    def generate(self, settings: GenerationSettings, image, output: Path | str, *,
                 cancel: Optional[CancelToken] = None, save_latents=None,
                 notify: Callable[[str], None] = lambda message: None) -> Iterator[Event]:
        """Load what the job needs, then run it (pipeline.generate) and yield its events."""
        from .pipeline import generate

        components = self.components(settings.model, notify=notify, cancel=cancel, fp8=settings.fp8)
        notices = self.apply_loras(settings.loras, notify)
        return _noticed(notices, generate(components, settings, image, output, cancel=cancel,
                                          placement=self.placement, save_latents=save_latents,
                                          metadata=self.record(settings.model, settings.loras)))

    def resume(self, output: Path | str, *, state=None, cancel: Optional[CancelToken] = None, save_latents=None,
               notify: Callable[[str], None] = lambda message: None) -> Iterator[Event]:
        """Continue an interrupted job (pipeline.resume), loading its model first; `state`: its ResumeState, if read."""
        from .pipeline import load_resume_state, resume

        state = self.resume_loras(state or load_resume_state(output))
        if self.worker:  # the sidecar names the worker that finishes the job
            state = dataclasses.replace(state, record={**state.record, "worker": dict(self.worker)})
        components = self.components(state.settings.model, notify=notify, cancel=cancel, fp8=state.settings.fp8)
        notices = self.apply_loras(state.settings.loras, notify)
        return _noticed(notices, resume(components, output, state=state, cancel=cancel, placement=self.placement,
                                        save_latents=save_latents))


    def extend(self, extension, output: Path | str, *, cancel: Optional[CancelToken] = None, save_latents=None,
               notify: Callable[[str], None] = lambda message: None) -> Iterator[Event]:
        """Extend a video (extend.extend, `extension` from extend.plan_extension), loading its model first."""
        from .extend import extend

        extension = self.extension_loras(extension)
        settings = extension.settings
        components = self.components(settings.model, notify=notify, cancel=cancel, fp8=settings.fp8)
        notices = self.apply_loras(settings.loras, notify)
        return _noticed(notices, extend(components, extension, output, cancel=cancel, placement=self.placement,
                                        save_latents=save_latents, metadata=self.record(settings.model, settings.loras)))

    def extension_loras(self, extension):
        """An extension whose LoRAs are its old job's, with them where the very same files are now (as for
        resume_loras); LoraError says which one is missing or changed."""
        return self.resume_loras(extension) if extension.loras_recorded else extension


def _noticed(notices: list[str], events: Iterator[Event]) -> Iterator[Event]:
    """The job's events after a Notice for each message (the events as they are when there is none)."""
    if not notices:
        return events

    def chained() -> Iterator[Event]:
        from .events import Notice

        for message in notices:
            yield Notice(message)
        yield from events

    return chained()
