"""Queue, exchanges and dead letters, declared the same way by every consumer and publisher.

Queue arguments must match across every declaration of a queue (RabbitMQ
refuses a redeclaration with different ones), so they are built in one place.
"""

from __future__ import annotations

import socket
import threading
import uuid
from dataclasses import dataclass
from typing import Any

from amqp.exceptions import PreconditionFailed
from kombu import Connection, Exchange, Queue
from kombu.exceptions import OperationalError as KombuOperationalError

from .domain import TooLarge
from .queue_protocol import DEAD_SUFFIX

INTERACTIVE_SUFFIX = ".interactive"


@dataclass(frozen=True)
class Topology:
    queue_name: str
    results_exchange_name: str

    @property
    def dead_name(self) -> str:
        return self.queue_name + DEAD_SUFFIX

    @property
    def dead_exchange(self) -> Exchange:
        return Exchange(self.dead_name, type="direct", durable=True)

    @property
    def dead_queue(self) -> Queue:
        return Queue(self.dead_name, exchange=self.dead_exchange, routing_key=self.queue_name, durable=True)

    @property
    def request_queue(self) -> Queue:
        """Bulk requests: watched folders publishing, `publish`, `reprocess --via-queue`, clients."""
        return self._requests(self.queue_name)

    @property
    def interactive_name(self) -> str:
        return self.queue_name + INTERACTIVE_SUFFIX

    @property
    def interactive_queue(self) -> Queue:
        """The gateway's requests, someone waiting on each: a queue of their own, so they are not
        behind a folder import's backlog (RabbitMQ hands out a queue's messages in order), and
        workers take them into the model's urgent lane. Dead letters go where the bulk queue's go."""
        return self._requests(self.interactive_name)

    def _requests(self, name: str) -> Queue:
        return Queue(
            name,
            durable=True,
            queue_arguments={
                "x-dead-letter-exchange": self.dead_name,
                "x-dead-letter-routing-key": self.queue_name,
            },
        )

    @property
    def results_exchange(self) -> Exchange:
        return Exchange(self.results_exchange_name, type="topic", durable=True)

    def declare(self, channel: Any) -> None:
        """Idempotent: every process may call it at start."""
        self.results_exchange(channel).declare()
        self.dead_exchange(channel).declare()
        self.dead_queue(channel).declare()
        self.request_queue(channel).declare()
        self.interactive_queue(channel).declare()


def reply_queue(prefix: str, timeout: float) -> Queue:
    """A queue of one process's own for the replies to its requests (the gateway's, `publish
    --wait`'s), named PREFIX.HOST.ID.

    Not exclusive: an exclusive queue dies with its connection, and a reply a worker sent while
    its owner reconnected was dropped. Durable, for the same reason across a broker restart (the
    requests' queues are durable and the replies persistent, so a request in flight is answered
    once the broker is back). Unused, it expires `timeout` + 60 s later: an owner gone for good
    leaves nothing behind; a clean stop deletes it sooner.
    """
    return Queue(
        f"{prefix}.{socket.gethostname()}.{uuid.uuid4().hex[:8]}",
        durable=True,
        auto_delete=False,
        expires=timeout + 60,
    )


# How long the consumer's and the gateway's loops wait for the broker before they look at their own
# queues again (results to reply with, requests to publish): kombu's wait cannot be woken, so each
# hop of an RPC waited up to this long. At 50 ms a request through the gateway paid ~100 ms for its
# two hops; at 5 ms it pays ~5, and an idle loop's 200 wake-ups a second cost no CPU that shows
# (bench/gateway_latency.py, bench/RESULTS.md).
POLL_SECONDS = 0.005


def connect(broker_url: str, **kwargs: Any) -> Connection:
    # Confirms: a publish returns only once the broker has the message, so we can ack after it.
    return Connection(broker_url, heartbeat=30, transport_options={"confirm_publish": True}, **kwargs)


def broker_errors(conn: Connection) -> tuple[type[BaseException], ...]:
    """What a broker that is away raises: kombu reports a failed connect as its own
    OperationalError (`ensure_connection`), a lost connection or channel as the transport's (for
    RabbitMQ's, socket errors among them: OSError)."""
    return (*conn.connection_errors, *conn.channel_errors, KombuOperationalError, OSError)


def too_large_for_broker(exc: BaseException) -> TooLarge | None:
    """A publish RabbitMQ refused for its size, as the 413 to report; None for any other error.

    The broker takes messages up to its `max_message_size` (128 MiB by default in RabbitMQ 3.x,
    16 MiB in 4.x) and tells no client the figure in advance: a bigger one closes the publishing
    channel with 406 PRECONDITION_FAILED (py-amqp reopens it) and the connection lives on. Retrying
    cannot help, and it is not the broker being away: the sender's fault, said as such.
    """
    if not isinstance(exc, PreconditionFailed):
        return None
    text = str(getattr(exc, "reply_text", "") or exc)
    if "larger than configured max size" not in text:
        return None
    text = text.removeprefix("PRECONDITION_FAILED - ")
    return TooLarge(
        f"The image is too large for the queue ({text}); send a smaller one or raise RabbitMQ's max_message_size"
    )


class BrokerUnavailable(Exception):
    """The broker could not be reached within STARTUP_TIMEOUT; the message is one line."""


def wait_for_broker(
    broker_url: str,
    timeout: float,
    first: float = 1.0,
    most: float = 5.0,
    stop: threading.Event | None = None,
) -> bool:
    """Connect, retrying with backoff for up to `timeout` seconds, one log line per attempt.

    True once connected; False as soon as `stop` is set (a SIGTERM while the broker is away must
    not wait out STARTUP_TIMEOUT).
    """
    import logging
    import time

    log = logging.getLogger(__name__)
    started = time.monotonic()
    attempt = 0
    while True:
        attempt += 1
        conn = connect(broker_url)
        try:
            conn.ensure_connection(max_retries=0)  # one attempt: this loop does the waiting
            return True
        except broker_errors(conn) as exc:
            waited = time.monotonic() - started
            where = conn.as_uri()
            if waited >= timeout:
                raise BrokerUnavailable(
                    f"cannot reach the broker at {where} after {waited:.0f}s (STARTUP_TIMEOUT={timeout:g}): {exc}; "
                    "check BROKER_URL and that RabbitMQ is up"
                ) from None
            delay = min(first * 2 ** (attempt - 1), most, max(0.1, timeout - waited))
            log.warning(
                "waiting for the broker at %s (attempt %d, %s); retrying in %.0fs - check BROKER_URL",
                where,
                attempt,
                exc,
                delay,
            )
            if (stop or threading.Event()).wait(delay):
                return False
        finally:
            conn.release()
