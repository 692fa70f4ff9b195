"""
An example custom addon, loaded by path: service identities may only run
commands inside a window of the day (a change freeze outside office hours).

    addons:
      - identity
      - path: addons/business_hours.py
        options: {hours: "07:00-19:00", days: [mon, tue, wed, thu, fri]}
      - record
"""

import time

from hoopgw import SERVICE, AddonFactory, ConfigError, Decision, Option
from hoopgw import validators as v

DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")


def _window(value, path):
    try:
        start, end = (part.strip() for part in v.string(value, path).split("-"))
        return tuple(int(h) * 60 + int(m) for h, m in (start.split(":"), end.split(":")))
    except ValueError:
        raise ConfigError(path, "expected a window such as 07:00-19:00, got %r" % (value,))


class BusinessHours:
    """
    Deny service identities' commands outside the configured hours (UTC).
    """

    name = "business_hours"
    options = (
        Option("hours", _window, (7 * 60, 19 * 60), "The window, as HH:MM-HH:MM in UTC."),
        Option("days", v.list_of(v.choice(*DAYS)), list(DAYS[:5]), "The days the window applies to."),
        Option("humans_too", v.boolean, False, "Apply the window to human identities as well."),
    )

    def __init__(self, options, context):
        self._start, self._end = options["hours"]
        self._days = set(options["days"])
        self._humans_too = options["humans_too"]
        self._clock = context.reactor

    def command_received(self, session, command):
        if session.identity.kind != SERVICE and not self._humans_too:
            return None
        now = time.gmtime(self._clock.seconds())
        minute = now.tm_hour * 60 + now.tm_min
        if DAYS[now.tm_wday] in self._days and self._start <= minute < self._end:
            return None
        return Decision.deny(
            "service identities may run commands only %02d:%02d-%02d:%02d UTC on %s"
            % (self._start // 60, self._start % 60, self._end // 60, self._end % 60, ", ".join(sorted(self._days))),
            rule="business_hours",
        )


business_hours = AddonFactory(BusinessHours)
