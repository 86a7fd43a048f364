"""The Gradio page: the command line's controls (the operator's components by name, uploaded pictures), the
memory plan before running, progress, cancel, the deep-zoom viewer of the result, its metadata and download
link, and a gallery of past results."""

from __future__ import annotations

import html
import secrets
from collections.abc import Iterator, Mapping
from typing import Any

import gradio as gr

from distlin.app.coordinator import Coordinator, Job
from distlin.app.library import ComponentLibrary
from distlin.app.request import PRESET_FIELDS, SCHEDULER_CHOICES, UPLOADS, GenerationRequest
from distlin.app.results import SavedResult
from distlin.app.uploads import picture_field
from distlin.errors import UsageError
from distlin.parallel.config import MODES
from distlin.presets import list_presets
from distlin.progress import PhaseEvent
from distlin.sizes import format_size

POLL_S = 0.25
VIEWER_HEIGHT_PX = 520
CSS = "#viewer iframe { width: 100%; border: 0; border-radius: 6px; background: #111; }"
NO_COMPONENT = "none"  # the dropdown choice for no ControlNet or no IP-Adapter
PRESET_CONTROLS = [*PRESET_FIELDS, "scheduler"]  # what choosing a preset fills in
COMPONENT_CONTROLS = ["init_image", "strength", "mask", "loras", "lora_scale", "controlnet", "control_image",
                      "control_scale", "ip_adapter", "ip_image", "ip_scale"]  # fmt: skip
CONTROLS = ["preset", *PRESET_CONTROLS, *COMPONENT_CONTROLS]
UPLOAD_CACHE_S = 3600  # Gradio's own copies of uploaded pictures are deleted after this long


class AppPage:
    """Builds the page for a coordinator and keeps each request's job under a random id the page holds (the
    request field), so Cancel stops the request that page started, however many one browser session queued,
    and nobody else's."""

    def __init__(self, coordinator: Coordinator, preset: str):
        self.coordinator = coordinator
        self.preset = preset
        self._jobs: dict[str, Job] = {}

    def build(self) -> gr.Blocks:
        runtime = self.coordinator.session.runtime
        start = GenerationRequest.for_preset(self.preset)
        blocks = gr.Blocks(title="distlin", analytics_enabled=False, delete_cache=(UPLOAD_CACHE_S, UPLOAD_CACHE_S))
        with blocks as page:
            gr.Markdown(f"## distlin · {runtime.world_size} rank(s) · {runtime.device.type}")
            with gr.Row():
                with gr.Column(scale=1):
                    controls = self._controls(start)
                    controls.update(self._component_controls(self.coordinator.session.library))
                    for name, control in controls.items():
                        control.elem_id = name
                    plan = gr.Textbox(label="memory plan", lines=6, interactive=False, elem_id="plan")
                    with gr.Row():
                        run = gr.Button("Generate", variant="primary", elem_id="generate")
                        cancel = gr.Button("Cancel", variant="stop", elem_id="cancel")
                    status = gr.Markdown("ready", elem_id="status")
                    running = gr.Textbox(visible=False, elem_id="request")  # the id Cancel stops
                with gr.Column(scale=2):
                    viewer = gr.HTML(elem_id="viewer")
                    download = gr.HTML(elem_id="download")
                    metadata = gr.JSON(label="metadata", elem_id="metadata")
            gallery = gr.Gallery(
                self._gallery, label="past results", columns=8, height=220, fit_columns=False, allow_preview=False,
                object_fit="contain", elem_id="gallery",
            )  # fmt: skip
            shown = [viewer, download, metadata]
            inputs = [controls[name] for name in CONTROLS]
            controls["preset"].change(self._preset_values, controls["preset"], [controls[n] for n in PRESET_CONTROLS])
            gr.on([c.change for c in inputs] + [page.load], self._plan, inputs, plan)
            run.click(self._run, inputs, [status, running, *shown, gallery], concurrency_limit=None)
            cancel.click(self._cancel, running, None, concurrency_limit=None)  # the request's status says it
            gallery.select(self._select, None, shown)
        return page

    def _controls(self, start: GenerationRequest) -> dict[str, gr.components.Component]:
        controls: dict[str, gr.components.Component] = {
            "preset": gr.Dropdown(list_presets(), value=start.preset, label="preset (a cascade preset: cascade on)"),
            "prompt": gr.Textbox(start.prompt, label="prompt", lines=2),
            "negative_prompt": gr.Textbox(start.negative_prompt, label="negative prompt"),
        }
        with gr.Row():
            controls["height"] = gr.Number(start.height, label="height", precision=0, step=8, minimum=8)
            controls["width"] = gr.Number(start.width, label="width", precision=0, step=8, minimum=8)
        with gr.Row():
            controls["steps"] = gr.Number(start.steps, label="steps", precision=0, minimum=1)
            controls["guidance_scale"] = gr.Number(start.guidance_scale, label="guidance scale", minimum=0)
            controls["seed"] = gr.Number(start.seed, label="seed", precision=0, minimum=0)
        with gr.Row():
            controls["mode"] = gr.Radio(list(MODES), value=start.mode, label="mode")
            controls["scheduler"] = gr.Dropdown(list(SCHEDULER_CHOICES), value=start.scheduler, label="scheduler")
        return controls

    def _component_controls(self, library: ComponentLibrary) -> dict[str, gr.components.Component]:
        """Uploads, and the operator's LoRAs, ControlNets and IP-Adapters by name (each hidden when
        ``--components`` has none)."""
        controls: dict[str, gr.components.Component] = {}
        upload = {"height": 160, "max_upload_mb": self.coordinator.limits.max_upload_mb}  # the file's bytes
        with gr.Accordion("pictures and components", open=False, elem_id="components"):
            with gr.Row():
                controls["init_image"] = picture_field("init image (a cascade preset upscales it)", **upload)
                controls["mask"] = picture_field("mask (inpaint where white; one pass)", **upload)
            controls["strength"] = gr.Slider(
                0, 1, value=0, step=0.05, label="strength of the init image (0: the preset's)"
            )
            with gr.Row(visible=bool(library.loras)):
                controls["loras"] = gr.Dropdown(list(library.loras), value=[], multiselect=True, label="LoRAs", scale=2)
                controls["lora_scale"] = gr.Slider(-2, 2, value=1, step=0.05, label="LoRA scale (each)")
            controls.update(
                _one_of(library.controlnets, ("controlnet", "ControlNet"), ("control_scale", "control scale"),
                        ("control_image", "control image (output size)"), upload)
            )  # fmt: skip
            controls.update(
                _one_of(library.ip_adapters, ("ip_adapter", "IP-Adapter"), ("ip_scale", "IP-Adapter scale"),
                        ("ip_image", "IP-Adapter reference picture (any size)"), upload)
            )  # fmt: skip
        return controls

    def _preset_values(self, preset: str) -> list[Any]:
        request = GenerationRequest.for_preset(preset)
        return [getattr(request, name) for name in PRESET_CONTROLS]

    def _plan(self, *values: Any) -> str:
        try:
            return self.coordinator.plan(request_from_controls(values))
        except UsageError as err:
            return f"refused: {err}"

    def _run(self, *values: Any) -> Iterator[list[Any]]:
        """Status and request id first, then progress, then the result (viewer, download, metadata, gallery)."""
        try:
            job = self.coordinator.submit(request_from_controls(values))
        except UsageError as err:
            yield [f"refused: {err}", "", *[gr.skip()] * 4]
            return
        request_id = secrets.token_urlsafe(16)
        self._jobs[request_id] = job
        try:
            yield [_progress_text(self.coordinator, job), request_id, *[gr.skip()] * 4]
            while not job.finished.wait(POLL_S):
                yield [_progress_text(self.coordinator, job), gr.skip(), *[gr.skip()] * 4]
        finally:
            self._jobs.pop(request_id, None)
        if job.result is None:
            text = "cancelled; nothing was written" if job.cancelled else f"failed: {job.error}"
            yield [text, gr.skip(), *[gr.skip()] * 4]
            return
        yield [f"done: {job.result.id}", gr.skip(), *self._show(job.result), self._gallery()]

    def _cancel(self, request_id: str | None) -> None:
        """Stop the request with this id (the page's latest), if it still waits or runs."""
        job = self._jobs.get(request_id or "")
        if job is not None:
            self.coordinator.cancel(job)

    def _select(self, event: gr.SelectData) -> list[Any]:
        caption = event.value.get("caption") if isinstance(event.value, dict) else None
        try:
            return self._show(self.coordinator.store.get(caption or ""))
        except UsageError:
            return [gr.skip()] * 3

    def _gallery(self) -> list[tuple[str, str]]:
        return [(str(result.thumbnail), result.id) for result in self.coordinator.store.results()]

    def _show(self, result: SavedResult) -> list[Any]:
        """Viewer, download link and metadata of one result."""
        metadata = result.metadata()
        size = format_size(metadata.get("width"), metadata.get("height"))
        dzi = html.escape(f"../results/{result.id}/image.dzi")
        viewer = (
            f'<iframe src="viewer/?dzi={dzi}" title="deep-zoom viewer of {result.id}" '
            f'style="height: {VIEWER_HEIGHT_PX}px" data-result="{result.id}"></iframe>'
        )
        download = (
            f'<a href="results/{result.id}/image.png" download="distlin-{result.id}.png" id="download-link">'
            f"Download PNG ({size} px, {result.image.stat().st_size / 2**20:.1f} MiB)</a>"
        )
        return [viewer, download, metadata]


def _one_of(
    offered: Mapping[str, str],
    choice: tuple[str, str],
    scale: tuple[str, str],
    picture: tuple[str, str],
    upload: dict[str, Any],
) -> dict[str, gr.components.Component]:
    """A dropdown of the operator's components of one kind (or none), its scale slider and its picture's upload,
    each given as (control name, label); all hidden when the operator offers none of that kind."""
    with gr.Row(visible=bool(offered)):
        controls = {
            choice[0]: gr.Dropdown([NO_COMPONENT, *offered], value=NO_COMPONENT, label=choice[1]),
            scale[0]: gr.Slider(0, 2, value=1, step=0.05, label=scale[1]),
        }
    controls[picture[0]] = picture_field(picture[1], visible=bool(offered), **upload)
    return controls


def request_from_controls(values: tuple[Any, ...]) -> GenerationRequest:
    """The request for the values of :data:`CONTROLS`: component names as chosen, uploaded pictures as the bytes
    their fields read (:func:`~distlin.app.uploads.picture_field`)."""
    controls = dict(zip(CONTROLS, values, strict=True))
    message = {name: controls[name] for name in ("preset", *PRESET_CONTROLS, "control_scale", "ip_scale")}
    message["loras"] = [[name, controls["lora_scale"]] for name in controls["loras"] or ()]
    for name in ("controlnet", "ip_adapter"):
        message[name] = None if controls[name] in (None, NO_COMPONENT) else controls[name]
    message["strength"] = controls["strength"] or None
    message.update({name: controls[name] or None for name in UPLOADS})
    return GenerationRequest.from_message(message)


def _phase_text(event: PhaseEvent) -> str:
    """``loading the model tiny-sd15 on cpu 0.2 s`` once done, ``LinFusion layers (fresh)…`` while running."""
    return f"{event.name}…" if event.seconds is None else f"{event.name} {event.seconds:.1f} s"


def _progress_text(coordinator: Coordinator, job: Job) -> str:
    ahead = coordinator.ahead_of(job)
    if job.cancel_requested.is_set():
        return "cancelling…"
    if ahead:
        return f"waiting: {ahead} request(s) ahead"
    progress = job.progress
    if progress is None:
        return "starting: " + " · ".join(_phase_text(event) for event in job.phases) if job.phases else "starting…"
    return f"stage {progress.stage + 1}/{progress.stages} · step {progress.step}/{progress.steps}"
