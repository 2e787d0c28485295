"""Retry an operation with exponential backoff and jitter until a deadline.

Peers either sleep a fixed time and retry forever (httpdirfs) or give up after a count
(rclone); both are wrong for a filesystem: a reader must get an answer within a bounded time,
and a flaky origin should not be hammered. This module gives both: backoff that doubles with
full jitter, honours ``Retry-After``, and never sleeps past the deadline.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Awaitable, Callable
from typing import TypeVar

import trio

from .errors import DeadlineExceededError, HttpSourceError

T = TypeVar("T")

INITIAL_BACKOFF = 0.1
MAX_BACKOFF = 5.0

log = logging.getLogger(__name__)


async def retry_until(
    attempt: Callable[[], Awaitable[T]],
    *,
    deadline: float,
    describe: str,
    per_attempt_deadline: bool = True,
) -> T:
    """Run *attempt* until it succeeds, fails permanently, or the trio-clock *deadline* passes.

    Transient `HttpSourceError`s are retried; anything else propagates at once. When the next
    sleep would cross the deadline, the last transient error is raised instead, so the caller's
    total wait is bounded by the deadline plus one attempt's own timeouts. An attempt still
    running at the deadline is cancelled, unless *per_attempt_deadline* is False (a long
    stream that makes progress must not be cut off; its stall timeout bounds it instead).
    """
    backoff = INITIAL_BACKOFF
    tries = 0
    last: HttpSourceError | None = None  # named when the deadline cuts an attempt off
    while True:
        tries += 1
        try:
            if not per_attempt_deadline:
                return await attempt()
            with trio.fail_after(max(0.0, deadline - trio.current_time()) or 0.001):
                return await attempt()
        except trio.TooSlowError:
            cause = f" (after {tries - 1} failed tries, the last: {last})" if last else ""
            raise DeadlineExceededError(
                f"{describe}: no answer before the deadline{cause}"
            ) from None
        except HttpSourceError as err:
            if not err.transient:
                raise
            last = err
            delay = random.uniform(0, backoff)
            if err.retry_after is not None:
                delay = max(delay, err.retry_after)
            if trio.current_time() + delay >= deadline:
                log.debug("%s: giving up after %d tries: %s", describe, tries, err)
                raise
            log.debug("%s: try %d failed (%s); retrying in %.2fs", describe, tries, err, delay)
            await trio.sleep(delay)
            backoff = min(backoff * 2, MAX_BACKOFF)
