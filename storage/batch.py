"""Group commit: operations that arrive while transactions are in flight share the next transaction.

No money logic here: an operation is opaque (a ``Job`` with a project id, for the lock order). The
engine's owner gives it one coroutine, ``commit(jobs)``, that runs the jobs in ONE transaction and
returns what to publish once it committed. The engine

- runs an operation at once, in the caller's task, if a worker slot is free (no hand-over);
- otherwise queues it; a worker takes everything queued (up to ``max_batch``), sorted by project
  (stable, so each project's operations keep their order and every batch locks rows in one global
  order), and commits it as one transaction — one commit, one fsync, for the whole batch;
- splits a batch whose commit failed: each job runs again alone, so one operation's trouble is
  never another's;
- resolves each job's future: True (committed), False (declined or a database error: nothing
  changed, the caller runs its generic path), or the exception of a bug in that job alone.

``storage/hot.py`` (PostgreSQL, two workers) and ``storage/sqlite_hot.py`` (one writer, one worker) use it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any, Generic, Protocol, TypeVar

log = logging.getLogger("smartspace.batch")


class Job(Protocol):
    @property
    def project_id(self) -> str: ...
    @property
    def ref(self) -> str: ...
    @property
    def future(self) -> asyncio.Future[bool]: ...


J = TypeVar("J", bound=Job)


class GroupCommit(Generic[J]):
    """``await engine.submit(job)`` → True (committed) / False (nothing changed).

    ``commit(jobs)`` runs the jobs in one transaction and returns the committed items to ``publish``;
    it raises to roll back. An exception of a type in ``expected`` (a decline, a database error) makes a
    lone job resolve False; any other exception is a bug: a lone job's caller gets it."""

    def __init__(self, commit: Callable[[list[J]], Awaitable[list[Any]]],
                 publish: Callable[[list[Any]], Awaitable[None]], *, expected: tuple[type[BaseException], ...],
                 workers: int = 1, max_batch: int = 64, outcomes: Counter[str] | None = None) -> None:
        self.commit = commit
        self.publish = publish
        self.expected = expected
        self.workers = workers
        self.max_batch = max_batch
        # batches committed, batches split after a failure, lone jobs declined or failed ("error").
        self.outcomes: Counter[str] = Counter() if outcomes is None else outcomes
        self._queue: list[J] = []
        self._active = 0
        self._tasks: set[asyncio.Task[None]] = set()

    async def submit(self, job: J, alone: Callable[[J], Awaitable[bool]] | None = None) -> bool:
        """``alone``: tried first when nothing at all is in flight (storage/hot.py's express lane); False
        from it means nothing changed, and the job commits as a batch of one."""
        if self._queue or self._active >= self.workers:
            self._queue.append(job)  # transactions are in flight: wait for the next batch
            self._start_worker()
            return await job.future
        self._active += 1
        try:
            if alone is not None and self._active == 1 and await alone(job):
                resolve(job.future, True)
            else:
                await self._run([job])
        finally:
            self._active -= 1
            self._start_worker()  # jobs that queued meanwhile
        return job.future.result()

    def _start_worker(self) -> None:
        if self._queue and self._active < self.workers:
            self._active += 1
            task = asyncio.create_task(self._worker(), name="smartspace-group-commit")
            self._tasks.add(task)  # held until it ends (when the queue is drained)
            task.add_done_callback(self._tasks.discard)

    async def _worker(self) -> None:
        try:
            while self._queue:
                batch = self._queue[:self.max_batch]
                del self._queue[:self.max_batch]
                batch.sort(key=lambda job: job.project_id)
                if len(batch) > 1 and await self._run(batch):
                    continue
                for job in batch:  # alone: a decline or failure is that job's own
                    if not job.future.done():
                        with contextlib.suppress(Exception):  # handed to the job's caller by _run
                            await self._run([job])
        except asyncio.CancelledError:  # shutting down: whoever still waits takes the generic path
            for job in self._queue:
                resolve(job.future, False)
            self._queue.clear()
            raise
        finally:
            self._active -= 1
        self._start_worker()  # jobs that arrived while this worker was finishing

    async def _run(self, jobs: list[J]) -> bool:
        """Commit ``jobs`` together. True: committed, published, every future True. False for a batch of
        several: rolled back, nothing resolved (the worker runs them alone)."""
        try:
            items = await self.commit(jobs)
        except self.expected as exc:
            if len(jobs) > 1:
                self.outcomes["split"] += 1
                return False
            declined = isinstance(exc, Declined)
            self.outcomes["declined" if declined else "error"] += 1
            if not declined:
                log.warning("rolled back after a database error", extra={"ref": jobs[0].ref, "error": repr(exc)})
            resolve(jobs[0].future, False)
            return False
        except BaseException as exc:  # a bug or a cancellation: nobody may wait forever
            if isinstance(exc, Exception) and len(jobs) > 1:  # perhaps one job's: each runs alone
                log.exception("batch failed", extra={"refs": [job.ref for job in jobs]})
                self.outcomes["split"] += 1
                return False
            for job in jobs:
                if job.future.done():
                    continue
                if isinstance(exc, Exception):
                    job.future.set_exception(exc)
                else:
                    job.future.cancel()
            raise
        self.outcomes["batches"] += 1
        try:
            await self.publish(items)
        finally:
            for job in jobs:
                resolve(job.future, True)
        return True


class Declined(Exception):
    """The operation does not take this path (no room, a period to roll, a row moved): roll back, and
    let the caller run its generic path, which knows every case and builds the exact error."""


def resolve(future: asyncio.Future[bool], value: bool) -> None:
    if not future.done():  # the waiting caller may have been cancelled meanwhile
        future.set_result(value)
