"""Notices between replicas survive their encoding: whatever their size, they travel as payloads
PostgreSQL accepts and merge back into what was posted."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from opscore.domain.models import Cancellation
from opscore.domain.notices import Notice
from opscore.store.notices import PAYLOAD_BYTES, decode, encode, merge

ids = st.text(min_size=1, max_size=40)
cancellations = st.builds(Cancellation, ids, ids, ids, st.integers(1, 10), st.text(max_size=200))
notices = st.builds(
    Notice,
    sender=ids,
    ready=st.sets(st.text(max_size=200), max_size=60),
    released=st.lists(st.tuples(ids, ids), max_size=300),
    cancelled=st.lists(cancellations, max_size=60),
    agents=st.sets(ids, max_size=200),
    joined=st.booleans(),
    watching=st.sets(ids, max_size=200),
    changed_runs=st.sets(ids, max_size=200),
)


@given(notices)
def test_a_notice_travels_in_payloads_under_the_limit_and_merges_back(notice: Notice) -> None:
    payloads = encode(notice)
    assert all(len(payload.encode()) <= PAYLOAD_BYTES for payload in payloads)
    back = merge([decode(payload) for payload in payloads])
    assert back.sender == notice.sender
    assert back.ready == notice.ready
    assert sorted(back.released) == sorted(notice.released)
    assert sorted(back.cancelled, key=repr) == sorted(notice.cancelled, key=repr)
    assert back.agents == notice.agents
    assert back.joined == notice.joined
    assert back.watching == notice.watching
    assert back.changed_runs == notice.changed_runs
