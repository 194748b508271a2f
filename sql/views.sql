-- DuckDB views and macros over feature set `${name}` (rendered by aefeatures at each publish
-- into STORE/catalog.sql; `duckdb -init STORE/catalog.sql` or run the file to get them).
-- `embedding` is FLOAT[${dim}] so array_cosine_similarity / array_inner_product work.
-- A user's model score for an item is array_inner_product(u.embedding, i.embedding) + i.bias.

-- Live version ----------------------------------------------------------------------------------
CREATE OR REPLACE VIEW ${name}_users AS
SELECT user_id, embedding::FLOAT[${dim}] AS embedding, n_interactions, reconstruction_error,
       anomaly_score, event_timestamp, created_timestamp
FROM read_parquet(${users});

-- Item attributes of the job's `[items]` table (if any) follow the fixed columns; null where an
-- item has none.
CREATE OR REPLACE VIEW ${name}_items AS
SELECT i.item_id, i.embedding::FLOAT[${dim}] AS embedding, i.bias, i.popularity, i.event_timestamp,
       i.created_timestamp${attribute_columns}
FROM read_parquet(${items}) i${attribute_join};

CREATE OR REPLACE VIEW ${name}_interactions AS
SELECT user_id, item_id, weight FROM read_parquet(${interactions});

-- Every published version (point-in-time questions) --------------------------------------------
-- A version counts as live from its created_timestamp until the next version's (valid_to).
CREATE OR REPLACE VIEW ${name}_versions AS
SELECT version, created_timestamp AS valid_from,
       lead(created_timestamp) OVER (ORDER BY version) AS valid_to,
       version = ${live} AS live, users, items, dim, ndcg_at_100
FROM (VALUES ${version_rows}) AS v(version, created_timestamp, users, items, dim, ndcg_at_100);

CREATE OR REPLACE VIEW ${name}_users_all AS
SELECT regexp_extract(filename, '[/\\]versions[/\\]([^/\\]+)[/\\]users\.parquet$$', 1) AS version,
       user_id, embedding::${all_type} AS embedding, n_interactions, reconstruction_error,
       event_timestamp, created_timestamp
FROM read_parquet(${users_all}, filename = true, union_by_name = true);

CREATE OR REPLACE VIEW ${name}_items_all AS
SELECT regexp_extract(filename, '[/\\]versions[/\\]([^/\\]+)[/\\]items\.parquet$$', 1) AS version,
       item_id, embedding::${all_type} AS embedding, bias, popularity, event_timestamp, created_timestamp
FROM read_parquet(${items_all}, filename = true, union_by_name = true);

-- Macros (live version) -------------------------------------------------------------------------
-- An id argument is cast to the id column's type (${user_type} users, ${item_type} items), so the
-- number 38 never matches the string id "0038".
-- Items whose vectors have the largest inner product with `item`'s (as `aefeatures similar`).
CREATE OR REPLACE MACRO ${name}_similar_items(item, k) AS TABLE
SELECT o.item_id, array_inner_product(q.embedding, o.embedding) AS score
FROM ${name}_items q, ${name}_items o
WHERE q.item_id = item::${item_type} AND o.item_id <> item::${item_type}
ORDER BY score DESC, o.item_id LIMIT k;

-- Users whose embeddings are closest to `user`'s by cosine similarity.
CREATE OR REPLACE MACRO ${name}_similar_users(user, k) AS TABLE
SELECT o.user_id, array_cosine_similarity(q.embedding, o.embedding) AS score
FROM ${name}_users q, ${name}_users o
WHERE q.user_id = user::${user_type} AND o.user_id <> user::${user_type}
ORDER BY score DESC, o.user_id LIMIT k;

-- Items for `user`, scored as the model scores them, items they already have left out
-- (as `aefeatures recommend`).
CREATE OR REPLACE MACRO ${name}_recommend(user, k) AS TABLE
SELECT i.item_id, array_inner_product(u.embedding, i.embedding) + i.bias AS score
FROM ${name}_users u, ${name}_items i
WHERE u.user_id = user::${user_type}
  AND i.item_id NOT IN (SELECT s.item_id FROM ${name}_interactions s WHERE s.user_id = user::${user_type})
ORDER BY score DESC, i.item_id LIMIT k;

-- Filtered forms: `keep` is a filter, the same SQL boolean expression over the item attributes
-- (and item_id) that lookups take, written unquoted as an argument:
--   SELECT * FROM ${name}_recommend_where(42, 10, category = 'books' AND in_stock);
CREATE OR REPLACE MACRO ${name}_recommend_where(user, k, keep) AS TABLE
SELECT i.item_id, array_inner_product(u.embedding, i.embedding) + i.bias AS score
FROM ${name}_users u, ${name}_items i
WHERE u.user_id = user AND (keep)
  AND i.item_id NOT IN (SELECT s.item_id FROM ${name}_interactions s WHERE s.user_id = user)
ORDER BY score DESC, i.item_id LIMIT k;

CREATE OR REPLACE MACRO ${name}_similar_items_where(item, k, keep) AS TABLE
SELECT o.item_id, array_inner_product(q.query_embedding, o.embedding) AS score
FROM (SELECT embedding AS query_embedding FROM ${name}_items WHERE item_id = item) q, ${name}_items o
WHERE o.item_id <> item AND (keep)
ORDER BY score DESC, o.item_id LIMIT k;

-- `user`'s embedding in the version that was live at `ts`.
CREATE OR REPLACE MACRO ${name}_user_embedding_asof(user, ts) AS TABLE
SELECT u.user_id, u.version, u.embedding
FROM ${name}_users_all u JOIN ${name}_versions v USING (version)
WHERE u.user_id = user::${user_type} AND v.valid_from <= ts::TIMESTAMPTZ
  AND (v.valid_to IS NULL OR ts::TIMESTAMPTZ < v.valid_to);
