"""The supervisor's restart decisions (pure): backoff doubles, a stable run resets it, it gives up."""

from __future__ import annotations

import pytest

from tools.supervise import Action, BackoffPolicy, ServiceRecord, apply, decide

POLICY = BackoffPolicy(initial_delay_s=1.0, factor=2.0, max_delay_s=5.0, max_restarts=4, stable_after_s=60.0)


def crash_and_restart(record: ServiceRecord, now_s: float) -> tuple[float, float]:
    """The service exits at `now_s`: returns (backoff delay, time it was restarted)."""
    action = decide(record, is_running=False, now_s=now_s, policy=POLICY)
    assert action is Action.SCHEDULE
    apply(record, action, now_s=now_s, policy=POLICY)
    delay_s = record.restart_at_s - now_s
    assert decide(record, is_running=False, now_s=record.restart_at_s - 0.01, policy=POLICY) is Action.NONE
    action = decide(record, is_running=False, now_s=record.restart_at_s, policy=POLICY)
    assert action is Action.RESTART
    restarted_at_s = record.restart_at_s
    apply(record, action, now_s=restarted_at_s, policy=POLICY)
    return delay_s, restarted_at_s


def test_backoff_doubles_up_to_the_cap_then_gives_up():
    record = ServiceRecord(started_at_s=0.0)
    now_s, delays_s = 10.0, []
    for _ in range(POLICY.max_restarts):
        delay_s, restarted_at_s = crash_and_restart(record, now_s)
        delays_s.append(delay_s)
        now_s = restarted_at_s + 1.0  # crashes again a second after each restart
    assert delays_s == [1.0, 2.0, 4.0, 5.0]
    action = decide(record, is_running=False, now_s=now_s, policy=POLICY)
    assert action is Action.GIVE_UP
    apply(record, action, now_s=now_s, policy=POLICY)
    assert decide(record, is_running=False, now_s=now_s + 1000, policy=POLICY) is Action.NONE


def test_a_stable_run_resets_the_backoff():
    record = ServiceRecord(started_at_s=0.0)
    _, restarted_at_s = crash_and_restart(record, 1.0)
    _, restarted_at_s = crash_and_restart(record, restarted_at_s + 1.0)
    assert record.num_restarts == 2
    delay_s, _ = crash_and_restart(record, restarted_at_s + POLICY.stable_after_s)
    assert delay_s == POLICY.initial_delay_s
    assert record.num_restarts == 1


def test_a_running_service_is_left_alone_and_awaits_health_after_a_restart():
    record = ServiceRecord(started_at_s=0.0)
    assert decide(record, is_running=True, now_s=100.0, policy=POLICY) is Action.NONE
    crash_and_restart(record, 100.0)
    assert record.is_awaiting_health


@pytest.mark.parametrize(
    "bad", [{"initial_delay_s": 0}, {"factor": 0.5}, {"max_delay_s": 0.1, "initial_delay_s": 1}, {"max_restarts": -1}]
)
def test_policy_refuses_nonsense(bad):
    with pytest.raises(ValueError):
        BackoffPolicy(**bad)
