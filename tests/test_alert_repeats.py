"""The intake's memory of delivered alerts: only an exact repeat, within the window, of what a
group already delivered is answered without Temporal; anything new or changed goes through."""

from __future__ import annotations

import copy
from typing import Any

from starters.alert_repeats import RecentAlerts
from tests.test_incident_intake import recorded
from workflows.incident_models import AlertNotification


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def notification(payload: dict[str, Any]) -> AlertNotification:
    return AlertNotification.model_validate(payload)


def test_an_exact_repeat_within_the_window_is_a_repeat_and_nothing_else_is() -> None:
    clock = Clock()
    recent = RecentAlerts(window=60, clock=clock)
    firing = recorded("firing", "astra-worker-a")
    assert not recent.is_repeat(notification(firing))  # nothing delivered yet
    recent.delivered(notification(firing))
    assert recent.is_repeat(notification(firing))

    # The same alerts, their JSON in another order: still a repeat.
    reordered = copy.deepcopy(firing)
    reordered["alerts"][0]["labels"] = dict(reversed(firing["alerts"][0]["labels"].items()))
    assert recent.is_repeat(notification(reordered))

    # Any change of an alert is news: its status, an annotation, a new alert beside it.
    assert not recent.is_repeat(notification(recorded("resolved", "astra-worker-a")))
    changed = copy.deepcopy(firing)
    changed["alerts"][0]["annotations"]["summary"] = "Worker astra-worker-a: no heartbeat for 90s"
    assert not recent.is_repeat(notification(changed))
    more = copy.deepcopy(firing)
    more["alerts"].append({**firing["alerts"][0], "fingerprint": "another"})
    assert not recent.is_repeat(notification(more))

    # Another group's alerts are its own.
    assert not recent.is_repeat(notification(recorded("firing", "astra-worker-b")))

    clock.now += 61
    assert not recent.is_repeat(notification(firing))  # the window has passed


def test_the_latest_delivery_is_what_counts() -> None:
    recent = RecentAlerts(window=60, clock=Clock())
    firing = notification(recorded("firing", "astra-worker-a"))
    resolved = notification(recorded("resolved", "astra-worker-a"))
    recent.delivered(firing)
    recent.delivered(resolved)
    assert recent.is_repeat(resolved)
    # Firing after resolved fires again, as the incident must hear.
    assert not recent.is_repeat(firing)


def test_the_memory_is_bounded_forgetting_the_least_recently_delivered_group() -> None:
    recent = RecentAlerts(window=60, max_groups=2, clock=Clock())
    a, b, c = (notification(recorded("firing", f"astra-worker-{n}")) for n in "abc")
    recent.delivered(a)
    recent.delivered(b)
    recent.delivered(a)  # a is now the most recent
    recent.delivered(c)
    assert recent.is_repeat(a) and recent.is_repeat(c)
    assert not recent.is_repeat(b)


def test_a_group_is_known_open_only_within_the_window_of_its_last_delivery() -> None:
    clock = Clock()
    recent = RecentAlerts(window=60, clock=clock)
    firing = notification(recorded("firing", "astra-worker-a"))
    assert not recent.knows_group(firing)
    recent.delivered(firing)
    assert recent.knows_group(firing)
    assert not recent.knows_group(notification(recorded("firing", "astra-worker-b")))
    clock.now += 61
    assert not recent.knows_group(firing)
