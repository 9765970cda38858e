"""The one backoff policy: the store, the queue consumer and the folder watcher all wait this way.

Exponential from `first` to `maximum` seconds, doubling per attempt, with the defaults in one
place (README, "Retries"). `attempts` bounds callers that give up (the store's, which then
reports a TransientError so the caller keeps the input); the others retry until they succeed.
"""

from __future__ import annotations

from dataclasses import dataclass

STORE_BACKOFF_FIRST = 0.2  # a store hiccup (lock, failover) usually passes within a second
STORE_BACKOFF_MAX = 3.0
STORE_ATTEMPTS = 5
RETRY_BACKOFF_FIRST = 1.0  # a queue message or watched file whose store or broker is down
RETRY_BACKOFF_MAX = 30.0
STARTUP_BACKOFF_FIRST = 1.0  # the database or broker not up yet at start (STARTUP_TIMEOUT bounds it)
STARTUP_BACKOFF_MAX = 5.0
PUBLISH_BACKOFF_FIRST = 0.5  # `blip2-service publish`: ride out a broker restart, then say so
PUBLISH_BACKOFF_MAX = 5.0
PUBLISH_ATTEMPTS = 6


@dataclass(frozen=True, slots=True)
class Backoff:
    first: float = RETRY_BACKOFF_FIRST
    maximum: float = RETRY_BACKOFF_MAX
    attempts: int | None = None  # None: no bound

    def delay(self, attempt: int) -> float:
        """Seconds to wait before retry number `attempt` (1 for the first retry)."""
        return float(min(self.first * 2 ** max(0, attempt - 1), self.maximum))

    def gives_up_after(self, attempt: int) -> bool:
        return self.attempts is not None and attempt >= self.attempts


STORE = Backoff(STORE_BACKOFF_FIRST, STORE_BACKOFF_MAX, STORE_ATTEMPTS)
WORK = Backoff(RETRY_BACKOFF_FIRST, RETRY_BACKOFF_MAX)
STARTUP = Backoff(STARTUP_BACKOFF_FIRST, STARTUP_BACKOFF_MAX)
PUBLISH = Backoff(PUBLISH_BACKOFF_FIRST, PUBLISH_BACKOFF_MAX, PUBLISH_ATTEMPTS)
ONCE = Backoff(attempts=1)  # callers that retry on their own (the watcher's publish mode)
