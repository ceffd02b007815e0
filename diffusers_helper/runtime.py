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
                 load_transformer: Optional[Callable] = None, **placement_options: Any):
        from .attention import resolve_attention
        from .loading import resolve_device

        self.device = resolve_device(device)
        # an unknown or unavailable kernel is refused now, before anything loads
        self.attention = resolve_attention(attention, self.device)
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

    # -- what it runs on ------------------------------------------------------------------------

    def sources(self) -> ModelSources:
        """The sources, resolved once (building the tiny models, for instance, happens on first use)."""
        if callable(self._sources):
            self._sources = self._sources()
        return self._sources

    def check(self, model: str) -> None:
        """Confirm that every file `model` needs is there; SourceError lists what is missing."""
        from .loading import check_sources

        check_sources(self.sources(), model)

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

    def record(self, model: str) -> dict[str, Any]:
        """What a job's sidecar says about where it ran: model sources, device, VRAM mode."""
        sources = self.sources()
        return {
            "sources": {"hunyuan": str(sources.hunyuan), "siglip": str(sources.siglip),
                        "transformer": str(sources.transformer(model))},
            "device": str(self.device),
            "vram_mode": self.placement.mode.value,
        }

    # -- loading --------------------------------------------------------------------------------

    def components(self, model: str, notify: Callable[[str], None] = lambda message: None,
                   cancel: Optional[CancelToken] = None):
        """Components for `model`, loading what is missing; `notify` hears what is being loaded."""
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
            if self._model != model:
                if self._transformer is not None:
                    # Release the other variant first: two transformers rarely fit in memory.
                    notify(f"Unloading the {display_name(self._model)} transformer")
                    self._transformer, self._model = None, None
                    from .memory import empty_cache

                    empty_cache(self.device)
                notify(f"Loading the {display_name(model)} transformer")
                from .attention import set_attention

                transformer = load_transformer(self.sources().transformer(model), self.device)
                set_attention(transformer, self._attention_choice, self.device)
                self._transformer, self._model = transformer, model
            return Components(shared=self._shared, transformer=self._transformer, model=model,
                              device=self.device, dtypes=component_dtypes(self.device))

    # -- jobs -------------------------------------------------------------------------------------

    def generate(self, settings: GenerationSettings, image, output: Path | str, *,
                 cancel: Optional[CancelToken] = None, save_latents=None,
                 notify: Callable[[str], None] = lambda message: None) -> Iterator[Event]:
        """Load what the job needs, then run it (pipeline.generate) and yield its events."""
        from .pipeline import generate

        components = self.components(settings.model, notify=notify, cancel=cancel)
        return generate(components, settings, image, output, cancel=cancel, placement=self.placement,
                        save_latents=save_latents, metadata=self.record(settings.model))

    def resume(self, output: Path | str, *, state=None, cancel: Optional[CancelToken] = None, save_latents=None,
               notify: Callable[[str], None] = lambda message: None) -> Iterator[Event]:
        """Continue an interrupted job (pipeline.resume), loading its model first; `state`: its ResumeState, if read."""
        from .pipeline import load_resume_state, resume

        state = state or load_resume_state(output)
        components = self.components(state.settings.model, notify=notify, cancel=cancel)
        return resume(components, output, state=state, cancel=cancel, placement=self.placement,
                      save_latents=save_latents)
