"""Validation recall@20 of the GNN embeddings while training: one cheap number per epoch.

After each epoch, the worker of rank 0 propagates the model over the training graph once, scores
every item for a seeded sample of validation users (``user · item``, full ranking, no candidates
and no learned ranker) and reports ``val_recall@20``: the share of the items each user bought in
the validation window (after the training edges) that are in the user's top 20. It is the
``next_basket_all`` task of :mod:`graph.tasks` on the embeddings alone, so it rises while the
embeddings learn and says when more epochs stop helping; the full evaluation stays the number
to compare models by.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from graph import schema as S
from graph.interactions import Interactions
from graph.metrics import recall_at_k
from graph.tasks import next_basket_tasks

VAL_METRIC = S.VAL_METRIC
DEFAULT_VAL_USERS = 300


@dataclass(frozen=True)
class ValidationSample:
    """Validation users and the items each bought in the validation window.

    Shapes:
        - users: ``[B]`` int64 user indices of the training graph
        - targets: ``B`` arrays of item indices
    """

    users: np.ndarray
    targets: list[np.ndarray]

    def __len__(self) -> int:
        return len(self.users)


def validation_sample(history: pd.DataFrame, window: pd.DataFrame, inter: Interactions,
                      cut: pd.Timestamp, *, max_users: int = DEFAULT_VAL_USERS,
                      seed: int = 0) -> ValidationSample:
    """A seeded sample of ``max_users`` users with purchases before ``cut`` and in ``window``
    (:func:`graph.tasks.next_basket_tasks`)."""
    nb_all, _ = next_basket_tasks(history, window, inter, cut, seed=seed, max_users=max_users)
    return ValidationSample(nb_all.users, list(nb_all.targets))


@torch.no_grad()
def embedding_recall(user_emb: torch.Tensor, item_emb: torch.Tensor, sample: ValidationSample,
                     k: int = S.TOP_K) -> float:
    """Mean recall@k of ranking every item by ``user · item`` for the sample's users.

    Shapes:
        - user_emb: ``[U, d]``
        - item_emb: ``[I, d]``
    """
    if len(sample) == 0:
        return float("nan")
    users = torch.as_tensor(sample.users, dtype=torch.long, device=user_emb.device)
    scores = user_emb[users] @ item_emb.T
    ranked = scores.topk(min(k, scores.shape[1]), dim=1).indices.cpu().numpy()
    return float(recall_at_k(ranked, sample.targets, k).mean())
