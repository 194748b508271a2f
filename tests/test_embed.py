"""Stage 4 and 5 in batches: user vectors computed a slice at a time equal a whole pass, and the
tables written a row group at a time hold exactly what one whole table would."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from aefeatures.config import InputConfig
from aefeatures.data.matrix import build_matrix
from aefeatures.data.read import read_interactions
from aefeatures.model.autoencoder import Autoencoder, AutoencoderShape, multinomial_nll
from aefeatures.model.device import to_batch
from aefeatures.model.embed import UserVectors, embed, encode
from aefeatures.quality.anomaly import anomaly_scores
from aefeatures.store import layout, tables

FIXTURE = Path(__file__).resolve().parent.parent / "fixtures" / "interactions.parquet"


@pytest.fixture(scope="module")
def matrix():
    return build_matrix(read_interactions(InputConfig(str(FIXTURE), weight_col="rating", timestamp_col="timestamp")),
                        binarize=False)


@pytest.fixture(scope="module", params=["dae", "vae", "recvae"])
def model(request, matrix):
    torch.manual_seed(0)
    return Autoencoder(AutoencoderShape(n_items=matrix.shape[1], dim=8, hidden=(16,), kind=request.param,
                                        dropout=0.5))


@pytest.fixture(scope="module")
def whole(model, matrix):
    """Every user embedded in one pass, with the reconstruction errors."""
    return encode(model, matrix.csr)


def test_embed_keeps_the_errors_of_a_whole_pass(model, matrix, whole):
    emb = embed(model, matrix)
    np.testing.assert_array_equal(emb.reconstruction_error, whole[1])
    assert isinstance(emb.user_vectors, UserVectors)
    assert emb.user_vectors.shape == (2030, 8) == whole[0].shape and emb.dim == 8
    assert emb.item_vectors.shape == (500, 8) and emb.item_bias.shape == (500,)


def test_the_reconstruction_error_is_the_models_nll_per_unit_of_weight(model, matrix, whole):
    """dae and vae: the NLL of the reconstruction from the whole vector; recvae: the denoising
    one, averaged over DENOISED_MASKS input-dropout masks of the training rate."""
    from aefeatures.model.embed import DENOISED_KINDS, DENOISED_MASKS, _uniform_hash

    model.eval()
    with torch.no_grad():
        batch = to_batch(matrix.csr, np.arange(matrix.shape[0]), torch.device("cpu"))
        if model.shape.kind in DENOISED_KINDS:
            position = torch.from_numpy(np.concatenate([np.arange(n) for n in np.diff(matrix.indptr)]))
            nll = np.zeros(matrix.shape[0])
            for k in range(DENOISED_MASKS):
                keep = (_uniform_hash(batch.indices, position, k) >= model.shape.dropout).float()
                assert 0.3 < keep.mean() < 0.7  # the training rate, 0.5
                mean, _ = model.encode(type(batch)(batch.indices, batch.offsets, batch.values * keep, batch.rows))
                nll += multinomial_nll(model.decoder(mean), batch).numpy() / DENOISED_MASKS
        else:
            mean, _ = model.encode(batch)
            nll = multinomial_nll(model.decoder(mean), batch).numpy()
    totals = np.add.reduceat(matrix.values, matrix.indptr[:-1])  # every user has items
    np.testing.assert_allclose(whole[1], nll / totals, rtol=1e-4)


def test_a_users_denoising_error_does_not_depend_on_its_batch(matrix):
    from aefeatures.model.embed import reconstruction_errors

    torch.manual_seed(0)
    model = Autoencoder(AutoencoderShape(n_items=matrix.shape[1], dim=8, hidden=(16,), kind="recvae", dropout=0.5))
    everyone = reconstruction_errors(model, matrix.csr)
    rows = np.array([7, 1500, 3])
    offsets, items, values = matrix.csr.gather(rows)
    indptr = np.append(offsets, len(items))
    from aefeatures.data.matrix import CSR

    alone = reconstruction_errors(model, CSR(indptr, items, values))
    np.testing.assert_allclose(alone, everyone[rows], rtol=1e-5)


@pytest.mark.parametrize("rows", [slice(0, 2030), slice(5, 9), slice(2000, None), slice(None, None, 7),
                                  slice(3, 3), np.array([2029, 0, 17, 17]), np.array([], dtype=np.int64)])
def test_user_vectors_of_any_rows_equal_the_whole_pass(model, matrix, whole, rows):
    got = UserVectors(model, matrix.csr)[rows]
    assert got.dtype == np.float32 and got.shape == whole[0][rows].shape
    np.testing.assert_allclose(got, whole[0][rows], rtol=1e-5, atol=1e-6)


def test_user_vectors_run_in_eval_mode(model, matrix, whole):
    model.train()  # dropout on, a vae would sample: indexing must not see it
    np.testing.assert_allclose(UserVectors(model, matrix.csr)[:50], whole[0][:50], rtol=1e-5, atol=1e-6)
    assert not model.training


class RecordingVectors:
    """User vectors that note how many users each request asks for."""

    def __init__(self, vectors: np.ndarray):
        self.vectors, self.requests = vectors, []
        self.shape = vectors.shape

    def __getitem__(self, rows):
        got = self.vectors[rows]
        self.requests.append(len(got))
        return got


def test_tables_written_in_row_groups_equal_the_whole_tables(tmp_path, monkeypatch, model, matrix, whole):
    monkeypatch.setattr(tables, "USERS_PER_ROW_GROUP", 300)
    monkeypatch.setattr(tables, "PAIRS_PER_ROW_GROUP", 5000)
    emb = embed(model, matrix)
    recorded = RecordingVectors(whole[0])
    emb = type(emb)(recorded, emb.reconstruction_error, emb.item_vectors, emb.item_bias)
    created = datetime(2026, 5, 1, tzinfo=timezone.utc)
    counts = tables.write_tables(tmp_path, matrix, emb, name="m", version="v1", created=created)
    assert counts == {"users": 2030, "items": 500, "interactions": matrix.nnz}
    assert max(recorded.requests) == 300 and sum(recorded.requests) == 2030  # never all users at once

    users = pq.ParquetFile(tmp_path / layout.USERS)
    assert users.metadata.num_row_groups == 7
    table = users.read()
    assert table.schema.metadata[b"aefeatures.dim"] == b"8"
    assert table.column("user_id").to_pylist() == matrix.user_ids.to_list()
    np.testing.assert_array_equal(np.stack(table.column("embedding").to_numpy(zero_copy_only=False)), whole[0])
    np.testing.assert_array_equal(table.column("n_interactions").to_numpy(), matrix.row_lengths())
    np.testing.assert_array_equal(table.column("reconstruction_error").to_numpy(), whole[1])
    np.testing.assert_array_equal(table.column("anomaly_score").to_numpy(),
                                  anomaly_scores(whole[1], matrix.row_lengths()))
    last_seen = table.column("last_interaction").to_numpy().astype("datetime64[us]")
    np.testing.assert_array_equal(last_seen, matrix.user_last_seen)
    assert set(table.column("created_timestamp").to_pylist()) == {created}
    assert set(table.column("event_timestamp").to_pylist()) == {created}

    pairs = pq.ParquetFile(tmp_path / layout.INTERACTIONS)
    assert pairs.metadata.num_row_groups > 5
    for g in range(pairs.metadata.num_row_groups):  # whole users in every row group
        group = pairs.read_row_group(g, columns=["user_row"]).column("user_row").to_numpy()
        assert matrix.indptr[group[0]] == sum(pairs.metadata.row_group(k).num_rows for k in range(g))
        assert matrix.indptr[group[-1] + 1] - matrix.indptr[group[0]] == len(group)
    table = pairs.read()
    user_rows = np.repeat(np.arange(matrix.shape[0]), matrix.row_lengths())
    np.testing.assert_array_equal(table.column("user_row").to_numpy(), user_rows)
    np.testing.assert_array_equal(table.column("item_row").to_numpy(), matrix.indices)
    np.testing.assert_array_equal(table.column("weight").to_numpy(), matrix.values)
    assert table.column("user_id").to_pylist() == matrix.user_ids.gather(user_rows).to_list()
    assert table.column("item_id").to_pylist() == matrix.item_ids.gather(matrix.indices).to_list()

    items = pq.read_table(tmp_path / layout.ITEMS)
    np.testing.assert_array_equal(items.column("popularity").to_numpy(), matrix.item_popularity())
    np.testing.assert_array_equal(items.column("bias").to_numpy(), emb.item_bias)


def test_user_ranges_cover_every_user_once_in_order():
    indptr = np.array([0, 3, 3, 10, 11, 12, 20, 21])  # user 2 alone holds 7 pairs, user 1 none
    # A range closes at the first user boundary at or past each multiple of 4 pairs.
    assert tables._user_ranges(indptr, 4) == [(0, 3), (3, 5), (5, 6), (6, 7)]
    assert tables._user_ranges(indptr, 100) == [(0, 7)]
    assert tables._user_ranges(np.array([0]), 4) == []
