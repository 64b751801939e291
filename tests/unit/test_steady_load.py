"""bench/steady_load.py: each load's session and event ids are its own."""

from __future__ import annotations

import pytest

from bench.steady_load import SteadyLoad

pytestmark = pytest.mark.unit


def _ids(load: SteadyLoad) -> set[str]:
    return {i for c in range(4) for n in range(60) for i in load.ids(c, n)}


def test_two_loads_on_one_app_never_send_the_same_ids() -> None:
    # A later load (the next chaos test of a module) re-sending an earlier load's event ids
    # would have them dropped by the shards as retries, and its "every acknowledged event is
    # stored" check would then hold without testing anything.
    first = SteadyLoad("http://127.0.0.1:1", ["a"], {})
    second = SteadyLoad("http://127.0.0.1:1", ["a"], {})
    assert not _ids(first) & _ids(second)


def test_a_load_groups_twenty_events_per_session_and_never_repeats_an_event_id() -> None:
    load = SteadyLoad("http://127.0.0.1:1", ["a"], {})
    events = [load.ids(c, n) for c in range(4) for n in range(60)]
    assert len({eid for _, eid in events}) == len(events)
    assert load.ids(0, 0)[0] == load.ids(0, 19)[0] != load.ids(0, 20)[0]
    assert load.ids(0, 5)[0] != load.ids(1, 5)[0]
