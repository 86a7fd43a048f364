"""Rank 0's side of the app: requests queue here and run one at a time on every rank.

One thread (:meth:`Coordinator.serve`) owns every collective on rank 0: it broadcasts each request, runs it
with the other ranks, saves the result and, while nothing waits, keeps the group alive with idle messages.
The web page only submits, watches and cancels :class:`Job` objects, from any thread.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field

from distlin.app.planning import describe_plan, fit_settings
from distlin.app.ranks import GENERATE, IDLE, REFUSALS, SHUTDOWN, RankChannel
from distlin.app.request import GenerationRequest, Limits
from distlin.app.results import ResultStore, SavedResult
from distlin.app.session import GenerationSession
from distlin.app.wording import in_field_terms
from distlin.errors import Cancelled, UsageError
from distlin.progress import PhaseEvent, report_to
from distlin.run import Progress


@dataclass
class Job:
    """One submitted request and what became of it; ``finished`` is set once it is done, cancelled or failed."""

    request: GenerationRequest
    cancel_requested: threading.Event = field(default_factory=threading.Event)
    finished: threading.Event = field(default_factory=threading.Event)
    progress: Progress | None = None
    phases: list[PhaseEvent] = field(default_factory=list)  # the run's phases before its first step, in order
    result: SavedResult | None = None
    error: str | None = None  # one line for the user
    cancelled: bool = False

    def report(self, progress: Progress) -> None:
        self.progress = progress

    def report_phase(self, event: PhaseEvent) -> None:
        """A phase started (appended) or finished (replaces its start), as the command line prints them."""
        if self.phases and event.seconds is not None and self.phases[-1] == PhaseEvent(event.name):
            self.phases[-1] = event
        else:
            self.phases.append(event)


class Coordinator:
    """Queues requests, runs them one at a time on every rank, and stops the other ranks when closed."""

    def __init__(
        self,
        channel: RankChannel,
        session: GenerationSession,
        store: ResultStore,
        limits: Limits | None = None,
        idle_message_s: float = 30.0,
    ):
        self.channel, self.session, self.store = channel, session, store
        self.limits = limits or Limits()
        self.idle_message_s = idle_message_s
        self.failure: str | None = None  # set when the rank group can no longer run requests
        self._waiting: deque[Job] = deque()
        self._running: Job | None = None
        self._closed = False
        self._changed = threading.Condition()
        self._planning = threading.Lock()  # one plan at a time: each decodes the request's pictures whole

    def plan(self, request: GenerationRequest) -> str:
        """The request's memory plan if this server accepts it: its pictures decoded whole, its settings checked
        as the command line's (steps against the scheduler, every number's range), within the limits and planned to
        fit the device; else UsageError with the reason. All on rank 0, before anything is broadcast."""
        try:
            with self._planning:  # so many requests at once cannot hold many decoded pictures at once
                request.check_pictures()
                with self.session.settings(request) as settings:
                    self.limits.check(settings)
                    fitted = fit_settings(settings, self.session.runtime, self.session.prepared)
                    return describe_plan(settings, fitted, self.session.runtime)
        except UsageError as err:
            raise UsageError(in_field_terms(str(err))) from None

    def submit(self, request: GenerationRequest) -> Job:
        """Queue a request; UsageError (one line for the user) if it is refused: by the queue's limits (checked
        before its pictures are decoded, and again as it joins), or by :meth:`plan`."""
        self._check_room(request)
        self.plan(request)
        job = Job(request)
        with self._changed:
            self._check_room(request)
            self._waiting.append(job)
            self._changed.notify_all()
        return job

    def _check_room(self, request: GenerationRequest) -> None:
        with self._changed:
            if self.failure is not None or self._closed:
                raise UsageError(self.failure or "the app is shutting down")
            self.limits.check_queue([job.request for job in self._waiting], request)

    def ahead_of(self, job: Job) -> int:
        """How many requests run before this one (0 once it runs)."""
        with self._changed:
            if job not in self._waiting:
                return 0
            return self._waiting.index(job) + (self._running is not None)

    def cancel(self, job: Job) -> None:
        """Stop a running job at its next step on every rank, or drop a waiting one."""
        job.cancel_requested.set()
        with self._changed:
            if job in self._waiting:
                self._waiting.remove(job)
                job.cancelled = True
                job.finished.set()

    def close(self) -> None:
        """Drop the waiting jobs, cancel the running one and let :meth:`serve` send shutdown to every rank."""
        with self._changed:
            self._closed = True
            waiting, self._waiting = list(self._waiting), deque()
            running = self._running
            self._changed.notify_all()
        for job in waiting:
            job.cancelled = True
            job.finished.set()
        if running is not None:
            running.cancel_requested.set()

    def serve(self) -> None:
        """Run jobs until :meth:`close`, then tell every rank to shut down. Returns early, with
        :attr:`failure` set, if a run fails in a way that may leave the ranks out of step or a rank is lost."""
        try:
            while (job := self._next()) is not None or not self._closed:
                if job is None:
                    self.channel.send(IDLE)
                    continue
                self._run(job)
                if self.failure is not None:
                    return
            self.channel.send(SHUTDOWN)
        except Exception as err:  # noqa: BLE001 - a rank left: under torchrun Ctrl-C reaches every rank at once
            if not self._closed:
                self.failure = f"lost contact with another rank ({_first_line(err)}); restart the app"

    def _next(self) -> Job | None:
        """The next waiting job, or None after ``idle_message_s`` without one (or once closed)."""
        with self._changed:
            if not self._waiting and not self._closed:
                self._changed.wait(self.idle_message_s)
            self._running = self._waiting.popleft() if self._waiting else None
            return self._running

    def _run(self, job: Job) -> None:
        self.channel.send(GENERATE, request=job.request.to_message())
        try:
            with report_to(job.report_phase):
                result = self.session.run(job.request, job.report, job.cancel_requested.is_set)
        except Cancelled:
            job.cancelled = True
        except REFUSALS as err:  # on every rank alike: the group is in step
            job.error = in_field_terms(str(err))
        except Exception as err:  # noqa: BLE001 - the ranks could not agree: the group is out of step
            job.error = in_field_terms(f"{type(err).__name__}: {_first_line(err)}")
            if self.session.runtime.world_size > 1:
                self.failure = f"the rank group failed ({job.error}); restart the app"
        else:
            try:
                job.result = self.store.save(result.image, result.metadata)
            except Exception as err:  # noqa: BLE001 - rank 0's disk alone: the other ranks are done and in step
                job.error = in_field_terms(f"the result could not be saved ({type(err).__name__}: {_first_line(err)})")
        finally:
            with self._changed:
                self._running = None
            job.finished.set()


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
