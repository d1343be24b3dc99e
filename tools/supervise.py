"""`make serve`'s supervision: a service that exits is restarted with exponential backoff.

The restart decision is a pure function of one service's record and the clock (`decide`), so it is
tested without processes; `Supervisor` polls a `Stack` from a thread, acts on the decisions and
says what it did. A service that keeps crashing is given up on after `max_restarts` restarts in a
row; one that stayed up `stable_after_s` has its count reset.
"""

from __future__ import annotations

import enum
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from grpc_health.v1 import health_pb2

from tools.stack import Stack


@dataclass(frozen=True)
class BackoffPolicy:
    initial_delay_s: float = 1.0
    factor: float = 2.0
    max_delay_s: float = 30.0
    max_restarts: int = 5  # restarts in a row (without a stable run between) before giving up
    stable_after_s: float = 60.0  # a run this long resets the count

    def __post_init__(self) -> None:
        if self.initial_delay_s <= 0 or self.factor < 1 or self.max_delay_s < self.initial_delay_s:
            raise ValueError("backoff needs initial_delay_s > 0, factor >= 1, max_delay_s >= initial_delay_s")
        if self.max_restarts < 0:
            raise ValueError("max_restarts must be >= 0")

    def delay_s(self, num_restarts: int) -> float:
        """Wait before restart number `num_restarts + 1`: initial, x factor each time, capped."""
        return min(self.max_delay_s, self.initial_delay_s * self.factor**num_restarts)


class Action(enum.Enum):
    NONE = "none"
    SCHEDULE = "schedule"  # it exited: restart at `restart_at_s`
    RESTART = "restart"  # the backoff delay is over: start it now
    GIVE_UP = "give_up"


@dataclass
class ServiceRecord:
    """What the supervisor remembers of one service. Times are time.monotonic() seconds."""

    started_at_s: float
    num_restarts: int = 0  # restarts in a row
    restart_at_s: float | None = None
    is_given_up: bool = False
    is_awaiting_health: bool = False


def decide(record: ServiceRecord, *, is_running: bool, now_s: float, policy: BackoffPolicy) -> Action:
    """The next step for one service. Pure: the caller applies it with `apply`."""
    if record.is_given_up:
        return Action.NONE
    if record.restart_at_s is not None:
        return Action.RESTART if now_s >= record.restart_at_s else Action.NONE
    if is_running:
        return Action.NONE
    num_restarts = 0 if now_s - record.started_at_s >= policy.stable_after_s else record.num_restarts
    return Action.GIVE_UP if num_restarts >= policy.max_restarts else Action.SCHEDULE


def apply(record: ServiceRecord, action: Action, *, now_s: float, policy: BackoffPolicy) -> None:
    """Update `record` for `action` (taken at `now_s`)."""
    if action is Action.SCHEDULE:
        if now_s - record.started_at_s >= policy.stable_after_s:
            record.num_restarts = 0
        record.restart_at_s = now_s + policy.delay_s(record.num_restarts)
    elif action is Action.RESTART:
        record.num_restarts += 1
        record.restart_at_s = None
        record.started_at_s = now_s
        record.is_awaiting_health = True
    elif action is Action.GIVE_UP:
        record.is_given_up = True


@dataclass
class Supervisor:
    """Restarts the stack's exited services from a background thread; `say` reports each step."""

    stack: Stack
    policy: BackoffPolicy = field(default_factory=BackoffPolicy)
    say: Callable[[str], None] = print
    poll_interval_s: float = 0.5
    records: dict[str, ServiceRecord] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        now_s = time.monotonic()
        self.records = {
            name: ServiceRecord(started_at_s=now_s) for name in self.stack.names if name in self.stack.processes
        }
        self._thread = threading.Thread(target=self._run, name="supervisor", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop supervising (before the stack is stopped, so its exits are not taken for crashes)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.poll_interval_s):
            for name, record in self.records.items():
                if self._stop.is_set():
                    return
                self.poll(name, record, time.monotonic())

    def poll(self, name: str, record: ServiceRecord, now_s: float) -> None:
        process = self.stack.processes[name]
        is_running = process.poll() is None
        action = decide(record, is_running=is_running, now_s=now_s, policy=self.policy)
        apply(record, action, now_s=now_s, policy=self.policy)
        if action is Action.SCHEDULE:
            self.say(
                f"supervisor: {name} exited with {process.returncode}; restart {record.num_restarts + 1} of "
                f"{self.policy.max_restarts} in {record.restart_at_s - now_s:.0f} s (log {self.stack.log_path(name)})"
            )
        elif action is Action.RESTART:
            self.stack.start(name)
            self.say(f"supervisor: restarted {name} (pid {self.stack.processes[name].pid})")
        elif action is Action.GIVE_UP:
            self.say(
                f"supervisor: giving up on {name}: it exited {record.num_restarts + 1} times in a row; "
                f"see {self.stack.log_path(name)}"
            )
        elif record.is_awaiting_health and is_running and self.stack.health(name) == health_pb2.HealthCheckResponse.SERVING:
            record.is_awaiting_health = False
            self.say(f"supervisor: {name} is SERVING again")
