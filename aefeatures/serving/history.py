"""Interaction histories given at request time (a user who signed up an hour ago, an anonymous
session, a known user's latest clicks), turned into the sparse rows the stored encoder reads.

A history is a list of item ids, with optional weights (ratings, counts, plays) in the same
order. It is encoded as the job encoded its input (the version's ``config.input``): entries
below ``min_weight`` dropped when weights are given, the largest weight kept for an item named
twice, then 1 per item (``binarize``), log(1 + weight) (``weight_transform = "log1p"``) or the
weight itself. Items the version does not know are reported, not an error, unless no item of a
history is known.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Sequence

import numpy as np

from aefeatures import errors
from aefeatures.schema import MAX_ID_CHARS

MAX_HISTORY = 100_000  # items in one history


class Histories(NamedTuple):
    """n histories as a CSR over item rows: ``indptr`` (n + 1,) int64, ``items`` (nnz,) int64
    sorted within each history, ``values`` (nnz,) float32 as the model reads them (the stored
    encoder, and a version's item-item part, whose weights they multiply), and for each
    history the ids it named that the version does not know (``unknown``, in the order given)."""

    indptr: np.ndarray
    items: np.ndarray
    values: np.ndarray
    unknown: list[list[Any]]

    def seen(self, n_items: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(indptr, items, sorted codes ``history * n_items + item``): what each history already
        has, as :attr:`aefeatures.serving.lookup.FeatureSet._seen` holds it for known users."""
        owner = np.repeat(np.arange(len(self.indptr) - 1, dtype=np.int64), np.diff(self.indptr))
        return self.indptr, self.items, owner * n_items + self.items


def encode_histories(histories: Sequence[Sequence[Any]], weights: Sequence[Sequence[Any] | None] | None,
                     item_rows, input_config: dict[str, Any], *, name: str, version: str) -> Histories:
    """Parse and encode ``histories`` (each a list of item ids) with their ``weights`` (None,
    or one list or None per history). ``item_rows`` maps ids to (rows, found) as
    :meth:`aefeatures.serving.lookup.IdIndex.rows` does.

    Raises ``BadInputError`` for a history that is not a list, is empty or too long, or whose
    weights are not as many finite numbers >= 0 as its items, or that keeps no item above
    ``min_weight``; ``NotFoundError`` when no item of a history is known; ``InvalidIdError``
    for a value that cannot be an item id.
    """
    if isinstance(histories, (str, bytes)) or not isinstance(histories, Sequence):
        raise errors.BadInputError("histories are a list of histories, each a list of item ids.")
    if weights is not None and (isinstance(weights, (str, bytes)) or len(weights) != len(histories)):
        raise errors.BadInputError("`weights` needs one list (or null) per history, in the same order.")
    binarize = bool(input_config.get("binarize", True))
    min_weight, transform = input_config.get("min_weight"), input_config.get("weight_transform", "none")
    indptr, all_rows, all_values, unknown = [0], [], [], []
    for h, history in enumerate(histories):
        where = f"history {h}" if len(histories) > 1 else "the history"
        history_weights = None if weights is None else weights[h]
        rows, values, missing = _one(history, history_weights, item_rows, where, name, version)
        if history_weights is not None and min_weight is not None:
            keep = values >= min_weight
            if not keep.any():
                raise errors.BadInputError(f"no item of {where} has a weight of at least {min_weight:g}, the job's "
                                           "`input.min_weight`; send items the job would count.")
            rows, values = rows[keep], values[keep]
        order = np.lexsort((-values, rows))  # by item, the largest weight first
        rows, values = rows[order], values[order]
        first = np.ones(len(rows), bool)
        first[1:] = rows[1:] != rows[:-1]
        rows, values = rows[first], values[first]
        if binarize:
            values = np.ones(len(rows), np.float64)
        elif transform == "log1p":
            values = np.log1p(values)
        all_rows.append(rows)
        all_values.append(values)
        indptr.append(indptr[-1] + len(rows))
        unknown.append(missing)
    return Histories(np.asarray(indptr, np.int64), np.concatenate(all_rows).astype(np.int64) if all_rows else
                     np.zeros(0, np.int64), np.concatenate(all_values).astype(np.float32) if all_values else
                     np.zeros(0, np.float32), unknown)


def _id_shaped(value: Any) -> bool:
    """Whether ``value`` could be an item id of some feature set: a string of at most
    :data:`MAX_ID_CHARS` characters, or an integer in the int64 or uint64 range."""
    if isinstance(value, str):
        return len(value) <= MAX_ID_CHARS
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)) \
        and -(2**63) <= int(value) < 2**64


def _one(history: Any, weights: Any, item_rows, where: str, name: str, version: str
         ) -> tuple[np.ndarray, np.ndarray, list[Any]]:
    """(known rows, their weights as float64, the unknown ids) of one history."""
    if isinstance(history, (str, bytes)) or not isinstance(history, Sequence):
        raise errors.BadInputError(f"{where} is a list of item ids, got {type(history).__name__}.")
    if not len(history):
        raise errors.BadInputError(f"{where} is empty: name at least one item the user interacted with.")
    if len(history) > MAX_HISTORY:
        raise errors.BadInputError(f"{where} has {len(history):,} items, above the {MAX_HISTORY:,} a history may "
                                   "have; send the most recent ones.")
    if weights is None:
        values = np.ones(len(history), np.float64)
    else:
        if isinstance(weights, (str, bytes)) or not isinstance(weights, Sequence) or len(weights) != len(history):
            raise errors.BadInputError(f"the weights of {where} must be a list of {len(history)} numbers, one per item.")
        bad = next((i for i, w in enumerate(weights) if isinstance(w, bool) or not isinstance(w, (int, float))
                    or not math.isfinite(w) or w < 0), None)
        if bad is not None:
            raise errors.BadInputError(f"weight {bad} of {where} is {errors.brief(weights[bad])}; weights are finite "
                                       "numbers of 0 or more.")
        values = np.asarray(weights, np.float64)
    malformed = next((i for i, item in enumerate(history) if not _id_shaped(item)), None)
    if malformed is not None:  # not an id of any feature set: the request is wrong, not the version
        raise errors.InvalidIdError("item", history[malformed],
                                    f"integers or strings of at most {MAX_ID_CHARS:,} characters")
    try:
        rows, found = item_rows(list(history))
    except errors.InvalidIdError:  # an id of the other type ("abc" where ids are integers): unknown here
        rows, found = np.zeros(len(history), np.int64), np.zeros(len(history), bool)
        for i, item in enumerate(history):
            try:
                one_row, one_found = item_rows([item])
            except errors.InvalidIdError:
                continue
            rows[i], found[i] = one_row[0], one_found[0]
    if not found.any():
        raise errors.NotFoundError("item", list(history), name, version)
    missing = [item for item, ok in zip(history, found) if not ok]
    return rows[found].astype(np.int64), values[found], missing
