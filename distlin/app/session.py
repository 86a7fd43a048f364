"""One rank's side of the app: the pipeline kept between requests, and each request run through
:func:`distlin.run.generate`, the function the command line runs, so the image is the command line's."""

from __future__ import annotations

import gc
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import TypeVar

import torch

from distlin.app.agreement import agree
from distlin.app.library import ComponentLibrary
from distlin.app.regroup import GroupRecovery
from distlin.app.request import GenerationRequest
from distlin.parallel.runtime import Runtime
from distlin.run import Prepared, ProgressReport, Result, fit_to_device, generate, kept_or_prepared
from distlin.settings import RunSettings

T = TypeVar("T")


class GenerationSession:
    """Runs requests on this rank, reusing the prepared pipeline while :func:`~distlin.run.pipeline_key` holds.

    ``device`` (the app's ``--device``) overrides the preset's, so every request runs where the ranks are;
    ``library`` (the app's ``--components``) holds the components a request may name; ``recovery`` (on a rank
    group) rebuilds the group when a rank fails alone mid-run (:mod:`distlin.app.regroup`).
    """

    def __init__(
        self,
        runtime: Runtime,
        device: str | None = None,
        library: ComponentLibrary | None = None,
        recovery: GroupRecovery | None = None,
    ):
        self.runtime = runtime
        self.device = device
        self.library = library or ComponentLibrary()
        self.recovery = recovery
        self._prepared: Prepared | None = None

    @property
    def prepared(self) -> Prepared | None:
        """The pipeline kept from the last request: a plan counts its RAM as available (reused or freed first)."""
        return self._prepared

    @contextmanager
    def settings(self, request: GenerationRequest) -> Iterator[RunSettings]:
        """The request's settings on this rank, its uploads existing as files until the block ends."""
        with request.settings(self.runtime.world_size, self.device, self.library) as settings:
            yield settings

    def run(
        self,
        request: GenerationRequest,
        on_progress: ProgressReport | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> Result:
        """Generate on every rank together (each rank calls this with the same request). Each part (settings, their
        fit to the device, pipeline, generation) ends with every rank agreeing that none failed
        (:func:`~distlin.app.agreement.agree`), so a failure on one rank is a refusal on all. The metadata names the
        request's components and uploads, not the paths they had on this server. A rank's pipeline is handed to the
        generation part by lookup, not held here, so a rebuilt group (:mod:`distlin.app.regroup`) can drop it with
        the old group's communicators."""
        with ExitStack() as uploads:
            requested = self._agreed(lambda: uploads.enter_context(self.settings(request)))
            # the run's own fit, before the pipeline: a saver it switches on (--micro-batch) is part of the pipeline
            settings = self._agreed(lambda: fit_to_device(requested, self.runtime, held=self._prepared))
            self._agreed(lambda: self._pipeline(settings))
            result = self._agreed(
                lambda: generate(settings, self.runtime, self._pipeline(settings), on_progress, should_stop)
            )
        result.metadata.update(request.metadata())
        return result

    def _agreed(self, part: Callable[[], T]) -> T:
        """:func:`~distlin.app.agreement.agree` on ``part``; rebuilding the group drops the prepared pipeline."""
        return agree(self.runtime, part, self.recovery, self._release)

    def _pipeline(self, settings: RunSettings) -> Prepared:
        """The prepared pipeline for ``settings``: the kept one while :func:`~distlin.run.pipeline_key` holds."""
        self._prepared = kept_or_prepared(self._prepared, settings, self.runtime, self._release)
        return self._prepared

    def _release(self) -> None:
        """Free the previous pipeline before loading another: two large models may not fit together."""
        self._prepared = None
        gc.collect()
        if self.runtime.device.type == "cuda":
            torch.cuda.empty_cache()
