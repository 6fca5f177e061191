"""The version lifecycle plan: Enabled -> Disabled -> DestroyScheduled -> Destroyed."""

from __future__ import annotations

import datetime as dt
import random
from collections.abc import Sequence
from dataclasses import dataclass, replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kustody.domain.lifecycle import (
    Action,
    ActionKind,
    Plan,
    References,
    State,
    Version,
    apply,
    count_references,
    destruction_impact,
    plan,
    superseded_at,
)
from kustody.domain.schedule import in_window
from kustody.domain.specs import (
    DEFAULT_DESTROY_AFTER,
    MaintenanceWindow,
    Rewrap,
    RotationPolicySpec,
)

UTC = dt.UTC
T0 = dt.datetime(2024, 1, 1, tzinfo=UTC)  # a Monday
DAY = dt.timedelta(days=1)
HOUR = dt.timedelta(hours=1)
NOREFS = References()
DESTRUCTIVE = {ActionKind.DISABLE, ActionKind.SCHEDULE_DESTROY, ActionKind.DESTROY}


def policy(
    retire_after: dt.timedelta | None = 30 * DAY,
    destroy_after: dt.timedelta = 30 * DAY,
    window: MaintenanceWindow | None = None,
) -> RotationPolicySpec:
    return RotationPolicySpec(90 * DAY, retire_after, destroy_after, Rewrap.AUTOMATIC, window)


# Tue, Wed, Thu 02:00-05:00 UTC, as in examples/rotationpolicy.yaml.
TUE_WED_THU = MaintenanceWindow(frozenset({1, 2, 3}), dt.time(2, 0), dt.timedelta(hours=3))


def two_versions(superseded: dt.datetime = T0 + 90 * DAY) -> list[Version]:
    return [
        Version(1, State.ENABLED, created_at=T0, fingerprint="f1"),
        Version(2, State.ENABLED, created_at=superseded, fingerprint="f2"),
    ]


def kinds(p: Plan) -> list[tuple[ActionKind, int]]:
    return [(a.kind, a.version) for a in p.actions]


@dataclass
class Clock:
    """A fake operator loop: plan, apply what is due, sleep until next_due."""

    versions: list[Version]
    primary: int | None
    policy: RotationPolicySpec | None
    refs: References
    now: dt.datetime
    deleting: bool = False

    def step(self) -> Plan:
        p = plan(
            self.versions, self.primary, self.policy, self.refs, self.now, deleting=self.deleting
        )
        by_number = {v.version: v for v in self.versions}
        for action in p.actions:
            by_number[action.version] = apply(
                by_number[action.version], action, self.now, self.policy
            )
        self.versions = [by_number[v.version] for v in self.versions]
        return p

    def run(self, limit: int = 50) -> list[tuple[dt.datetime, ActionKind, int]]:
        log: list[tuple[dt.datetime, ActionKind, int]] = []
        for _ in range(limit):
            p = self.step()
            log.extend((self.now, a.kind, a.version) for a in p.actions)
            if p.actions:
                continue  # level-based: plan again at the same instant
            if p.next_due is None:
                return log
            assert p.next_due > self.now
            self.now = p.next_due
        raise AssertionError(f"no fixed point after {limit} steps: {log}")

    def state(self, version: int) -> Version:
        return next(v for v in self.versions if v.version == version)


# -- the full walk ---------------------------------------------------------------------------


def test_full_lifecycle_walk() -> None:
    superseded = T0 + 90 * DAY
    clock = Clock(two_versions(superseded), 2, policy(), NOREFS, now=superseded)
    log = clock.run()
    assert [(kind, v) for _, kind, v in log] == [
        (ActionKind.DISABLE, 1),
        (ActionKind.SCHEDULE_DESTROY, 1),
        (ActionKind.DESTROY, 1),
    ]
    (disabled_at, _, _), (scheduled_at, _, _), (destroyed_at, _, _) = log
    # retireAfter counts from the rotation that superseded v1, not from v1's creation.
    assert disabled_at == superseded + 30 * DAY
    assert scheduled_at >= disabled_at
    # Destruction waits exactly destroyAfter after it was scheduled.
    assert destroyed_at == scheduled_at + 30 * DAY
    v1 = clock.state(1)
    assert v1.state is State.DESTROYED
    assert v1.destroyed_at == destroyed_at
    assert clock.state(2) == two_versions(superseded)[1]  # the primary is untouched


def test_walk_uses_the_default_destroy_after_without_policy_when_deleting() -> None:
    clock = Clock(two_versions(), 2, None, NOREFS, now=T0 + 100 * DAY, deleting=True)
    log = clock.run()
    destroys = [t for t, kind, _ in log if kind is ActionKind.DESTROY]
    schedules = [t for t, kind, _ in log if kind is ActionKind.SCHEDULE_DESTROY]
    assert len(destroys) == 2
    assert len(schedules) == 2
    assert min(destroys) - max(schedules) == DEFAULT_DESTROY_AFTER == dt.timedelta(hours=720)
    assert all(v.state is State.DESTROYED for v in clock.versions)


def test_nothing_happens_before_retire_after() -> None:
    superseded = T0 + 90 * DAY
    p = plan(two_versions(superseded), 2, policy(), NOREFS, superseded + 30 * DAY - HOUR)
    assert p.actions == ()
    assert p.next_due == superseded + 30 * DAY


def test_retire_after_zero_disables_as_soon_as_unreferenced() -> None:
    superseded = T0 + 90 * DAY
    refs = References(data_keys={1: 2})
    p = plan(two_versions(superseded), 2, policy(retire_after=dt.timedelta(0)), refs, superseded)
    assert p.actions == ()
    assert p.blocked == ((1, "referenced by 2 object(s)"),)
    p = plan(two_versions(superseded), 2, policy(retire_after=dt.timedelta(0)), NOREFS, superseded)
    assert kinds(p) == [(ActionKind.DISABLE, 1)]


def test_without_retire_after_versions_are_never_retired() -> None:
    clock = Clock(two_versions(), 2, policy(retire_after=None), NOREFS, now=T0 + 10_000 * DAY)
    assert clock.run() == []
    assert all(v.state is State.ENABLED for v in clock.versions)


def test_without_policy_nothing_is_retired_or_destroyed() -> None:
    # The CRD: without rotationPolicyRef versions are never retired or destroyed automatically,
    # not even one that somebody disabled by hand.
    versions = [
        Version(1, State.DISABLED, T0, disabled_at=T0 + DAY),
        Version(2, State.ENABLED, T0 + 2 * DAY),
        Version(3, State.ENABLED, T0 + 3 * DAY),
    ]
    clock = Clock(versions, 3, None, NOREFS, now=T0 + 1000 * DAY)
    assert clock.run() == []
    assert [v.state for v in clock.versions] == [State.DISABLED, State.ENABLED, State.ENABLED]


def test_superseded_at_is_the_creation_of_the_next_version() -> None:
    versions = [
        Version(1, State.ENABLED, T0),
        Version(2, State.ENABLED, T0 + DAY),
        Version(3, State.ENABLED, T0 + 5 * DAY),
    ]
    assert superseded_at(versions, 1) == T0 + DAY
    assert superseded_at(versions, 2) == T0 + 5 * DAY
    assert superseded_at(versions, 3) is None
    assert superseded_at(list(reversed(versions)), 1) == T0 + DAY


def test_several_old_versions_retire_from_their_own_supersession() -> None:
    versions = [
        Version(1, State.ENABLED, T0),
        Version(2, State.ENABLED, T0 + 10 * DAY),
        Version(3, State.ENABLED, T0 + 20 * DAY),
    ]
    p = plan(versions, 3, policy(retire_after=15 * DAY), NOREFS, T0 + 25 * DAY)
    assert kinds(p) == [(ActionKind.DISABLE, 1)]
    assert p.next_due == T0 + 35 * DAY  # v2: superseded at day 20, plus 15 days


# -- references ------------------------------------------------------------------------------


def test_referenced_version_is_blocked_then_retired_when_free() -> None:
    superseded = T0 + 90 * DAY
    refs = References(data_keys={1: 1}, secrets={1: 2})
    clock = Clock(two_versions(superseded), 2, policy(), refs, now=superseded + 40 * DAY)
    p = clock.step()
    assert p.actions == ()
    assert p.blocked == ((1, "referenced by 3 object(s)"),)
    clock.refs = References(data_keys={2: 3})  # everything re-wrapped under v2
    p = clock.step()
    assert kinds(p) == [(ActionKind.DISABLE, 1)]


@pytest.mark.parametrize(
    "refs", [References(data_keys={1: 1}), References(secrets={1: 1})], ids=["datakey", "secret"]
)
def test_referenced_disabled_version_is_restored(refs: References) -> None:
    v1 = Version(1, State.DISABLED, T0, disabled_at=T0 + 100 * DAY)
    p = plan([v1, two_versions()[1]], 2, policy(), refs, T0 + 200 * DAY)
    assert kinds(p) == [(ActionKind.RESTORE, 1)]


@pytest.mark.parametrize(
    "refs", [References(data_keys={1: 1}), References(secrets={1: 1})], ids=["datakey", "secret"]
)
def test_referenced_scheduled_version_keeps_countdown_but_is_never_destroyed(
    refs: References,
) -> None:
    v1 = Version(
        1, State.DESTROY_SCHEDULED, T0, disabled_at=T0 + 100 * DAY, destroy_at=T0 + 150 * DAY
    )
    versions = [v1, two_versions()[1]]
    before = plan(versions, 2, policy(), refs, T0 + 120 * DAY)
    assert kinds(before) == []
    assert before.next_due == T0 + 150 * DAY
    assert destruction_impact(versions, refs) == [
        {"version": 1, "dataKeys": refs.data_keys.get(1, 0), "secrets": refs.secrets.get(1, 0)}
    ]
    # Past its destroyAt: refused while referenced, and said so.
    after = plan(versions, 2, policy(), refs, T0 + 200 * DAY)
    assert kinds(after) == []
    assert [v for v, _ in after.blocked] == [1]
    assert "referenced" in after.blocked[0][1]


@pytest.mark.parametrize("state", [State.DISABLED, State.DESTROY_SCHEDULED])
def test_restore_request_cancels_disable_or_destruction(state: State) -> None:
    v1 = Version(1, state, T0, disabled_at=T0 + 100 * DAY, destroy_at=T0 + 150 * DAY)
    p = plan(
        [v1, two_versions()[1]], 2, policy(), References(), T0 + 120 * DAY, restore=frozenset({1})
    )
    assert kinds(p) == [(ActionKind.RESTORE, 1)]


def test_destroyed_version_is_never_restored() -> None:
    versions = [Version(1, State.DESTROYED, T0, destroyed_at=T0 + DAY), two_versions()[1]]
    p = plan(versions, 2, policy(), References(data_keys={1: 5}), T0 + 300 * DAY)
    assert p == Plan((), (), None)


def test_destruction_impact_lists_only_what_would_be_lost() -> None:
    versions = [
        Version(1, State.DESTROY_SCHEDULED, T0, destroy_at=T0 + DAY),
        Version(2, State.DESTROY_SCHEDULED, T0, destroy_at=T0 + DAY),
        Version(3, State.DISABLED, T0),
        Version(4, State.ENABLED, T0),
    ]
    refs = References(data_keys={1: 2, 3: 1, 4: 9}, secrets={1: 1})
    assert destruction_impact(versions, refs) == [{"version": 1, "dataKeys": 2, "secrets": 1}]
    assert destruction_impact(versions, NOREFS) == []


# -- maintenance window ------------------------------------------------------------------------


def test_retirement_waits_for_the_window() -> None:
    # v2 created on a Wednesday; retireAfter 3 days later is Saturday 12:00: outside the window.
    superseded = T0 + 2 * DAY + 12 * HOUR
    p_window = policy(retire_after=3 * DAY, destroy_after=2 * DAY, window=TUE_WED_THU)
    saturday = superseded + 3 * DAY
    assert saturday.weekday() == 5
    p = plan(two_versions(superseded), 2, p_window, NOREFS, saturday)
    assert p.actions == ()
    next_tuesday = T0 + 8 * DAY + 2 * HOUR
    assert p.next_due == next_tuesday  # the operator is told when to come back
    clock = Clock(two_versions(superseded), 2, p_window, NOREFS, now=saturday)
    log = clock.run()
    disabled_at = next(t for t, kind, _ in log if kind is ActionKind.DISABLE)
    assert disabled_at == next_tuesday


def test_destruction_deadline_is_not_moved_by_the_window() -> None:
    destroy_at = T0 + 5 * DAY + 12 * HOUR  # a Saturday noon, window closed
    assert not in_window(TUE_WED_THU, destroy_at)
    versions = [Version(1, State.DESTROY_SCHEDULED, T0, destroy_at=destroy_at), two_versions()[1]]
    p_window = policy(window=TUE_WED_THU)
    before = plan(versions, 2, p_window, NOREFS, destroy_at - dt.timedelta(seconds=1))
    assert before.actions == ()
    assert before.next_due == destroy_at
    p = plan(versions, 2, p_window, NOREFS, destroy_at)
    assert kinds(p) == [(ActionKind.DESTROY, 1)]


def test_retirement_inside_the_window() -> None:
    superseded = T0 + 90 * DAY
    now = T0 + 18 * 7 * DAY + DAY + 3 * HOUR  # a Tuesday 03:00, after retireAfter (day 120)
    assert now >= superseded + 30 * DAY
    assert in_window(TUE_WED_THU, now)
    p = plan(two_versions(superseded), 2, policy(window=TUE_WED_THU), NOREFS, now)
    assert kinds(p) == [(ActionKind.DISABLE, 1)]


# -- deleting (deletionPolicy: Destroy) --------------------------------------------------------


def test_deleting_retires_everything_now_even_the_primary_and_outside_the_window() -> None:
    now = T0 + 5 * DAY + 12 * HOUR  # Saturday: window closed
    versions = [*two_versions(T0 + DAY), Version(3, State.DISABLED, T0, disabled_at=now - HOUR)]
    p = plan(versions, 2, policy(retire_after=None, window=TUE_WED_THU), NOREFS, now, deleting=True)
    assert sorted(kinds(p)) == sorted(
        [(ActionKind.DISABLE, 1), (ActionKind.DISABLE, 2), (ActionKind.SCHEDULE_DESTROY, 3)]
    )


def test_deleting_never_touches_referenced_versions() -> None:
    refs = References(data_keys={2: 1})
    p = plan(two_versions(), 2, policy(), refs, T0 + 91 * DAY, deleting=True)
    assert kinds(p) == [(ActionKind.DISABLE, 1)]
    assert p.blocked == ((2, "referenced by 1 object(s)"),)


def test_deleting_keeps_the_destruction_waiting_period() -> None:
    destroy_at = T0 + 10 * DAY
    versions = [Version(1, State.DESTROY_SCHEDULED, T0, destroy_at=destroy_at)]
    p = plan(versions, None, policy(), NOREFS, T0 + DAY, deleting=True)
    assert p.actions == ()
    assert p.next_due == destroy_at


def test_schedule_destroy_uses_the_policy_waiting_period() -> None:
    v = Version(1, State.DISABLED, T0, disabled_at=T0)
    action = Action(ActionKind.SCHEDULE_DESTROY, 1, "disabled")
    assert apply(v, action, T0 + DAY, policy(destroy_after=48 * HOUR)).destroy_at == T0 + 3 * DAY
    assert apply(v, action, T0 + DAY, None).destroy_at == T0 + DAY + dt.timedelta(hours=720)


# -- garbled status --------------------------------------------------------------------------


def test_destroy_scheduled_without_destroy_at_is_never_destroyed_at_once() -> None:
    # destroyAt missing or unparseable: destruction is irreversible, so the waiting period is
    # started again instead of destroying now.
    raw = {"version": 1, "state": "DestroyScheduled", "destroyAt": "not a time"}
    v1 = Version.from_status(raw)
    assert v1.destroy_at is None
    now = T0 + 100 * DAY
    p = plan([v1, two_versions()[1]], 2, policy(), NOREFS, now)
    assert ActionKind.DESTROY not in {a.kind for a in p.actions}
    clock = Clock([v1, two_versions()[1]], 2, policy(), NOREFS, now=now)
    log = clock.run()
    assert [(kind, v) for _, kind, v in log][-1] == (ActionKind.DESTROY, 1)
    assert log[-1][0] >= now + 30 * DAY


@pytest.mark.parametrize("state", [State.DISABLED, State.DESTROY_SCHEDULED])
def test_primary_is_never_destroyed_unless_deleting(state: State) -> None:
    # An inconsistent status (primary not Enabled) must not lead to destroying the version
    # that wraps new data keys.
    versions = [
        Version(1, State.ENABLED, T0),
        Version(2, state, T0 + DAY, disabled_at=T0 + DAY, destroy_at=T0 + 2 * DAY),
    ]
    clock = Clock(versions, 2, policy(retire_after=dt.timedelta(0)), NOREFS, now=T0 + 100 * DAY)
    clock.run()
    assert clock.state(2).state is state


def test_status_round_trip() -> None:
    v = Version(
        3,
        State.DESTROY_SCHEDULED,
        created_at=T0,
        fingerprint="ab12",
        disabled_at=T0 + DAY,
        destroy_at=T0 + 31 * DAY,
        data_keys=4,
    )
    raw = v.to_status()
    assert raw == {
        "version": 3,
        "state": "DestroyScheduled",
        "createdAt": "2024-01-01T00:00:00Z",
        "fingerprint": "ab12",
        "dataKeys": 4,
        "disabledAt": "2024-01-02T00:00:00Z",
        "destroyAt": "2024-02-01T00:00:00Z",
    }
    assert Version.from_status(raw) == v
    assert Version.from_status({"version": 1}).state is State.ENABLED


# -- properties ------------------------------------------------------------------------------

hours = st.integers(0, 400 * 24).map(lambda h: T0 + h * HOUR)
windows = st.builds(
    MaintenanceWindow,
    st.frozensets(st.integers(0, 6), min_size=1),
    st.builds(dt.time, st.integers(0, 23), st.sampled_from([0, 30])),
    st.integers(1, 48).map(lambda n: n * 30 * dt.timedelta(minutes=1)),
)
policies = st.builds(
    policy,
    retire_after=st.none() | st.integers(0, 60 * 24).map(lambda h: h * HOUR),
    destroy_after=st.integers(24, 60 * 24).map(lambda h: h * HOUR),
    window=st.none() | windows,
)


@dataclass(frozen=True)
class Case:
    versions: list[Version]
    primary: int | None
    policy: RotationPolicySpec | None
    refs: References
    now: dt.datetime
    deleting: bool

    def plan(self, versions: Sequence[Version] | None = None) -> Plan:
        return plan(
            self.versions if versions is None else versions,
            self.primary,
            self.policy,
            self.refs,
            self.now,
            deleting=self.deleting,
        )


def _after(base: dt.datetime, hours: int) -> dt.datetime:
    return base + hours * HOUR


@st.composite
def cases(draw: st.DrawFn) -> Case:
    count = draw(st.integers(1, 6))
    created = sorted(draw(st.lists(hours, min_size=count, max_size=count)))
    versions = []
    for number, created_at in enumerate(created, start=1):
        state = draw(st.sampled_from(State))
        later = st.builds(_after, st.just(created_at), st.integers(0, 120 * 24))
        stamped = state is not State.ENABLED
        versions.append(
            Version(
                number,
                state,
                created_at,
                disabled_at=draw(st.none() | later) if stamped else None,
                destroy_at=(draw(st.none() | later) if state is State.DESTROY_SCHEDULED else None),
                destroyed_at=draw(later) if state is State.DESTROYED else None,
            )
        )
    numbers = st.integers(1, count)
    enabled = [v.version for v in versions if v.state is State.ENABLED]
    # Usually the highest Enabled version, sometimes none, sometimes an inconsistent one.
    primary = draw(st.none() | numbers | (st.just(max(enabled)) if enabled else st.none()))
    refs = References(
        data_keys=draw(st.dictionaries(numbers, st.integers(0, 3))),
        secrets=draw(st.dictionaries(numbers, st.integers(0, 3))),
    )
    now = created[-1] + draw(st.integers(0, 300 * 24 * 60)) * dt.timedelta(minutes=1)
    return Case(versions, primary, draw(st.none() | policies), refs, now, draw(st.booleans()))


FAST = settings(max_examples=150, deadline=None)


@FAST
@given(cases())
def test_prop_referenced_versions_are_never_disabled_or_destroyed(case: Case) -> None:
    """A referenced version never moves toward destruction. (Re-arming the countdown of a
    version already in DestroyScheduled, when its destroyAt is unreadable, moves it away.)"""
    state = {v.version: v.state for v in case.versions}
    for action in case.plan().actions:
        rearm = (
            action.kind is ActionKind.SCHEDULE_DESTROY
            and state[action.version] is State.DESTROY_SCHEDULED
        )
        if action.kind in DESTRUCTIVE and not rearm:
            assert case.refs.count(action.version) == 0, action


@FAST
@given(cases())
def test_prop_primary_is_never_disabled_unless_deleting(case: Case) -> None:
    if case.deleting or case.primary is None:
        return
    for action in case.plan().actions:
        if action.version == case.primary:
            assert action.kind not in DESTRUCTIVE, action


@FAST
@given(cases())
def test_prop_destroyed_versions_get_no_action(case: Case) -> None:
    destroyed = {v.version for v in case.versions if v.state is State.DESTROYED}
    assert not destroyed & {a.version for a in case.plan().actions}


@FAST
@given(cases())
def test_prop_next_due_is_in_the_future(case: Case) -> None:
    p = case.plan()
    assert p.next_due is None or p.next_due > case.now


@FAST
@given(cases())
def test_prop_destroy_only_at_or_after_destroy_at(case: Case) -> None:
    by_number = {v.version: v for v in case.versions}
    for action in case.plan().actions:
        if action.kind is ActionKind.DESTROY:
            v = by_number[action.version]
            assert v.state is State.DESTROY_SCHEDULED
            assert v.destroy_at is not None
            assert case.now >= v.destroy_at


@FAST
@given(cases())
def test_prop_actions_fit_the_state(case: Case) -> None:
    by_number = {v.version: v for v in case.versions}
    p = case.plan()
    acted = [a.version for a in p.actions]
    assert len(acted) == len(set(acted)), "at most one action per version"
    for action in p.actions:
        state = by_number[action.version].state
        if action.kind is ActionKind.DISABLE:
            assert state is State.ENABLED
        elif action.kind is ActionKind.RESTORE:
            assert state in (State.DISABLED, State.DESTROY_SCHEDULED)
            assert case.refs.count(action.version) > 0
        elif action.kind is ActionKind.SCHEDULE_DESTROY:
            assert state in (State.DISABLED, State.DESTROY_SCHEDULED)
        else:
            assert state is State.DESTROY_SCHEDULED


@FAST
@given(cases())
def test_prop_scheduled_retirement_respects_retire_after_and_window(case: Case) -> None:
    if case.deleting:
        return
    by_number = {v.version: v for v in case.versions}
    for action in case.plan().actions:
        if action.kind is ActionKind.DISABLE:
            assert case.policy is not None
            assert case.policy.retire_after is not None
            start = superseded_at(case.versions, action.version)
            assert start is not None
            assert case.now >= start + case.policy.retire_after
            assert in_window(case.policy.window, case.now)
        if action.kind is ActionKind.SCHEDULE_DESTROY and by_number[action.version].state is (
            State.DISABLED
        ):
            # Without a policy (or retireAfter), nothing is destroyed automatically.
            assert case.policy is not None
            assert case.policy.retire_after is not None


@FAST
@given(cases(), st.randoms(use_true_random=False))
def test_prop_plan_is_deterministic(case: Case, rnd: random.Random) -> None:
    first = case.plan()
    assert case.plan() == first
    shuffled = list(case.versions)
    rnd.shuffle(shuffled)
    other = case.plan(shuffled)
    assert set(other.actions) == set(first.actions)
    assert set(other.blocked) == set(first.blocked)
    assert other.next_due == first.next_due


@FAST
@given(cases())
def test_prop_applying_the_plan_makes_progress(case: Case) -> None:
    p = case.plan()
    by_number = {v.version: v for v in case.versions}
    for action in p.actions:
        by_number[action.version] = apply(by_number[action.version], action, case.now, case.policy)
    after = case.plan(list(by_number.values()))
    # Nothing is asked twice: each applied action moved its version on.
    assert not set(p.actions) & set(after.actions)
    for action in p.actions:
        v = by_number[action.version]
        if action.kind is ActionKind.SCHEDULE_DESTROY:
            assert v.destroy_at is not None
            assert v.destroy_at - case.now >= dt.timedelta(hours=24)


def test_unknown_policy_free_plan_is_empty() -> None:
    assert plan([], None, None, NOREFS, T0) == Plan((), (), None)
    only = [Version(1, State.ENABLED, T0)]
    assert plan(only, 1, policy(retire_after=dt.timedelta(0)), NOREFS, T0 + 999 * DAY) == Plan(
        (), (), None
    )


def test_versions_are_values() -> None:
    v = Version(1, State.ENABLED, T0)
    assert replace(v, state=State.DISABLED) != v


@st.composite
def keysets(draw: st.DrawFn, count: int) -> list[tuple[frozenset[int], int | None]]:
    """DataKeys with several generations each, wrapped under any versions, and a Secret
    labelled with one of them (or none, or another during a re-wrap)."""
    numbers = st.integers(1, count)
    datakeys = draw(st.lists(st.lists(numbers, min_size=1, max_size=4), max_size=6))
    return [(frozenset(generations), draw(st.none() | numbers)) for generations in datakeys]


@FAST
@given(cases(), st.data())
def test_prop_no_version_wrapping_any_retained_generation_is_disabled_or_destroyed(
    case: Case, data: st.DataObject
) -> None:
    """Issue 11: a KEK version is referenced while any retained generation of any DataKey
    is wrapped under it — the planner never moves such a version toward destruction."""
    used = data.draw(keysets(len(case.versions)))
    refs = count_references(used)
    state = {v.version: v.state for v in case.versions}
    wrapped = {v for generations, _ in used for v in generations}
    actions = replace(case, refs=refs).plan().actions
    for action in actions:
        rearm = (
            action.kind is ActionKind.SCHEDULE_DESTROY
            and state[action.version] is State.DESTROY_SCHEDULED
        )
        if action.kind in DESTRUCTIVE and not rearm:
            assert action.version not in wrapped, action
