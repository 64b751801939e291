"""Online events (exported from the serving app's session log, ``actors/session_export.py``) as
extra training data for ``train_job.py --online-events``.

Online events are training data only: they join the training part of the run (the graph the
published model's embeddings are propagated over, and its signals), never the validation window
the ranker is fitted on and never the test part it is evaluated on, so the evaluation table stays
comparable with a run without them.

Time: they keep their order and the gaps between them, but when the newest is later than the end
of the base training data (``split_at``), as when a shop serves today a model of the built-in 2017
data, they are shifted back as one block so that the newest sits just before ``split_at``.
Otherwise the recency decay, measured from the newest training event, would age every base event
by the years between them.
"""

from __future__ import annotations

import logging
from collections.abc import Set
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from graph import schema as S
from graph.data import _read_table, _require, validate_events
from graph.errors import DataError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class OnlineMerge:
    """What joining online events to a training part did."""

    events: int
    users: int
    new_users: int
    unknown_items: int
    forgotten_events: int
    shifted_by: pd.Timedelta

    def describe(self) -> str:
        shift = (f"; shifted back {self.shifted_by.days:,} days to end at the split"
                 if self.shifted_by > pd.Timedelta(0) else "")
        return (f"{self.events:,} online events of {self.users:,} users ({self.new_users:,} new) "
                f"joined the training data ({self.unknown_items:,} for items outside the catalogue "
                f"and {self.forgotten_events:,} of forgotten users dropped{shift})")


def read_online_events(path: str | Path) -> pd.DataFrame:
    """A canonical events file of online events, validated like ``--events``.

    Raises:
        DataError: unreadable, or a column missing or malformed (names the file and the fix).
    """
    ev = _read_table(path, "online-events").to_pandas()
    _require(ev, (S.USER_COL, S.ITEM_COL, S.TS_COL, S.EVENT_COL), path, "online-events")
    return validate_events(ev, str(path))


def merge_online(train: pd.DataFrame, online: pd.DataFrame, items: pd.DataFrame,
                 split_at: pd.Timestamp, forgotten: Set[str] = frozenset()
                 ) -> tuple[pd.DataFrame, OnlineMerge]:
    """``train`` with the online events added (see the module docstring for the rules).

    Raises:
        DataError: no online event is left to add (all of unknown items or forgotten users).
    """
    mine = online[~online[S.USER_COL].isin(forgotten)] if forgotten else online
    forgotten_events = len(online) - len(mine)
    known = mine[S.ITEM_COL].isna() | mine[S.ITEM_COL].isin(items[S.ITEM_COL])
    unknown = int((~known).sum())
    mine = mine[known]
    if mine.empty:
        raise DataError(
            f"none of the {len(online):,} online events can be trained on ({unknown:,} name items "
            f"outside the catalogue, {forgotten_events:,} are of forgotten users): were they "
            "posted against a model of this catalogue?", field="online_events")
    end = split_at - pd.Timedelta(seconds=1)
    shift = max(mine[S.TS_COL].max() - end, pd.Timedelta(0))
    mine = mine.assign(**{S.TS_COL: mine[S.TS_COL] - shift})
    users = set(mine[S.USER_COL].unique())
    # The base's columns, and the context columns only the online events have (the base's rows
    # get no value there), so that a retrain learns the devices and regions shoppers posted.
    cols = train.columns.intersection(mine.columns).append(
        pd.Index([c for c in S.CONTEXT_ATTRIBUTES if c in mine.columns and c not in train.columns]))
    merged = pd.concat([train, mine[cols]],
                       ignore_index=True).sort_values(S.TS_COL, kind="stable", ignore_index=True)
    return merged, OnlineMerge(
        events=len(mine), users=len(users), new_users=len(users - set(train[S.USER_COL].unique())),
        unknown_items=unknown, forgotten_events=forgotten_events, shifted_by=shift)
