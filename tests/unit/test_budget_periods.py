"""UTC calendar periods for budgets: day, week (Monday), month (incl. December → January), total."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

from domain.budgets import needs_roll, period_end, period_start


def at(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


def test_period_starts_and_ends():
    now = at(2026, 11, 26, 23, 59, 59)  # a Thursday
    assert period_start("day", now) == at(2026, 11, 26)
    assert period_start("week", now) == at(2026, 11, 23) and at(2026, 11, 23).weekday() == 0
    assert period_start("month", now) == at(2026, 11, 1)
    assert period_start("total", now) is None
    assert period_end("day", at(2026, 11, 26)) == at(2026, 11, 27)
    assert period_end("week", at(2026, 11, 23)) == at(2026, 11, 30)
    assert period_end("month", at(2026, 12, 1)) == at(2027, 1, 1)
    assert period_end("month", at(2027, 2, 1)) == at(2027, 3, 1)
    assert period_end("total", at(2026, 1, 1)) is None


def test_boundaries_are_utc_not_local():
    tokyo = timezone(timedelta(hours=9))
    local_morning = datetime(2026, 11, 27, 8, 0, tzinfo=tokyo)  # still 26 Nov 23:00 UTC
    assert period_start("day", local_morning) == at(2026, 11, 26)
    assert period_start("week", at(2026, 11, 30, 0, 0)) == at(2026, 11, 30)  # Monday 00:00 starts a week
    assert period_start("week", at(2026, 11, 29, 23, 59)) == at(2026, 11, 23)


def test_needs_roll():
    assert needs_roll("day", at(2026, 11, 25), at(2026, 11, 26, 0, 0)) == at(2026, 11, 26)
    assert needs_roll("day", at(2026, 11, 26), at(2026, 11, 26, 23, 59)) is None
    assert needs_roll("month", at(2026, 10, 1), at(2026, 11, 1)) == at(2026, 11, 1)
    assert needs_roll("total", at(2020, 1, 1), at(2026, 11, 26)) is None
