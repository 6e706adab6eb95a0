"""The alert intake's memory of what it just delivered, so that repeats cost Temporal nothing.

Alertmanager sends a group's alerts again and again: every ``repeat_interval``, on every retry of
a delivery it thinks failed, and once from each peer of an HA pair. In a storm most notifications
carry nothing the incident has not seen, and the incident takes such a repeat as a repeat (it
changes no alert, wakes nothing). Each would still cost a signal-with-start, a history event and
a workflow task, which is what a storm's intake pays for most: so the intake remembers, per
group, what it delivered in the last minute, and answers an exact repeat of it at once.

Only an exact repeat is answered from here: every alert of the notification must be one the
intake delivered to that group within the window, with the same content (status, labels,
annotations, times). A change of any alert, or an alert the group has not sent, is delivered as
always. The window is far shorter than any sensible ``repeat_interval`` or ``group_interval``:
it catches retries, HA peers and storms, and a group whose incident has just closed opens a new
one on its next repeat after the window, as it would have at that repeat anyway. The memory is
per API process and bounded; losing it (a restart, another replica) only costs a signal.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import OrderedDict
from collections.abc import Callable

from workflows.incident_models import Alert, AlertNotification

REPEAT_WINDOW_SECONDS = 60.0
"""How long a delivered alert counts as known (far below Alertmanager's intervals: see above)."""
MAX_GROUPS = 10_000
"""Groups remembered; the least recently delivered is forgotten first."""


def _content(alert: Alert) -> str:
    """An alert's content, the same however its sender ordered the JSON."""
    dumped = json.dumps(alert.model_dump(mode="json", by_alias=True), sort_keys=True)
    return hashlib.sha256(dumped.encode()).hexdigest()


class RecentAlerts:
    """Per alert group: each alert's content as last delivered, and when."""

    def __init__(
        self,
        window: float = REPEAT_WINDOW_SECONDS,
        max_groups: int = MAX_GROUPS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.window, self.max_groups, self.clock = window, max_groups, clock
        self._groups: OrderedDict[str, dict[str, tuple[str, float]]] = OrderedDict()

    def is_repeat(self, notification: AlertNotification) -> bool:
        """Whether every alert of ``notification`` was delivered to its group, as it is now,
        within the window."""
        known = self._groups.get(notification.group_key)
        if known is None:
            return False
        since = self.clock() - self.window
        for alert in notification.alerts:
            seen = known.get(alert.fingerprint)
            if seen is None or seen[1] < since or seen[0] != _content(alert):
                return False
        return True

    def knows_group(self, notification: AlertNotification) -> bool:
        """Whether the intake delivered to this group's incident within the window: it was
        open then, so it most likely still is."""
        known = self._groups.get(notification.group_key)
        since = self.clock() - self.window
        return known is not None and any(seen[1] >= since for seen in known.values())

    def delivered(self, notification: AlertNotification) -> None:
        """Remember what the incident now has; call only once Temporal took it."""
        now = self.clock()
        known = self._groups.pop(notification.group_key, {})
        known = {fp: seen for fp, seen in known.items() if seen[1] >= now - self.window}
        for alert in notification.alerts:
            known[alert.fingerprint] = (_content(alert), now)
        self._groups[notification.group_key] = known
        while len(self._groups) > self.max_groups:
            self._groups.popitem(last=False)
