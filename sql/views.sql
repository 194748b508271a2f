-- DuckDB views and macros over feature set `${name}` (rendered by aefeatures at each publish
-- into STORE/catalog.sql; `duckdb -init STORE/catalog.sql` or run the file to get them).
-- `embedding` is FLOAT[${dim}] so array_cosine_similarity / array_inner_product work.
-- A user's model score for an item is array_inner_product(u.embedding, i.embedding) + i.bias,
-- plus, where the version has an item-item part, the sum of x * weight over the rows of
-- `${name}_item_neighbours` for that item whose neighbour_id the user has (x: the interaction's weight).

-- Live version ----------------------------------------------------------------------------------
CREATE OR REPLACE VIEW "${name}_users" AS
SELECT user_id, embedding::FLOAT[${dim}] AS embedding, n_interactions, reconstruction_error,
       anomaly_score, ${live_last} AS last_interaction, ${live_event} AS event_timestamp, created_timestamp
FROM read_parquet(${users});

-- `folded_in`: the users a vector rests on for an item folded in after training (`aefeatures
-- embed`), null for a trained item. Item attributes of the job's `[items]` table (if any) follow
-- the fixed columns; null where an item has none.
CREATE OR REPLACE VIEW "${name}_items" AS
SELECT i.item_id, i.embedding::FLOAT[${dim}] AS embedding, i.bias, i.popularity, ${live_last} AS last_interaction,
       ${live_event} AS event_timestamp, i.created_timestamp, ${live_folded} AS folded_in${attribute_columns}
FROM read_parquet(${items}) i${attribute_join};

CREATE OR REPLACE VIEW "${name}_interactions" AS
SELECT user_id, item_id, weight FROM read_parquet(${interactions});

-- The sparse item-item part of the live version (a dlae's, where it has one; no rows otherwise):
-- a user who has `neighbour_id`, with weight x in `${name}_interactions`, gets x * weight added to
-- `item_id`'s score. No item is its own neighbour.
CREATE OR REPLACE VIEW "${name}_item_neighbours" AS
${item_neighbours};

-- Every published version (point-in-time questions) --------------------------------------------
-- A version's values are valid from its valid_from (every row's event_timestamp: when its tables
-- were written, after training) until the next version's (valid_to). Versions of table schema 1
-- stored the latest interaction as event_timestamp: these views show it as last_interaction and
-- the version's valid_from as event_timestamp, so every version reads with schema 2's meaning.
CREATE OR REPLACE VIEW "${name}_versions" AS
SELECT version, valid_from, lead(valid_from) OVER (ORDER BY version) AS valid_to,
       version = ${live} AS live, users, items, dim, ndcg_at_100, schema_version
FROM (VALUES ${version_rows}) AS v(version, valid_from, users, items, dim, ndcg_at_100, schema_version);

-- What changed at each publish, against the version live before it (NULLs for the first version,
-- embedded versions and versions written before drift was measured): alignment and its residual,
-- quantiles of the cosine between shared users' and items' live and new vectors, top-10 churn
-- of sampled users, and the rank correlation of shared users' anomaly scores.
CREATE OR REPLACE VIEW "${name}_drift" AS
SELECT * FROM (VALUES ${drift_rows}) AS d(version, against, aligned, residual, user_cos_q05, user_cos_q25,
    user_cos_q50, user_cos_q75, user_cos_q95, item_cos_q05, item_cos_q50, item_cos_q95, churn_mean,
    churn_all_changed, anomaly_rank_spearman)
WHERE version IS NOT NULL;

CREATE OR REPLACE VIEW "${name}_users_all" AS
SELECT f.version, f.user_id, f.embedding, f.n_interactions, f.reconstruction_error,
       CASE WHEN v.schema_version = 1 THEN f.event_timestamp ELSE f.last_interaction END AS last_interaction,
       v.valid_from AS event_timestamp, f.created_timestamp
FROM (SELECT regexp_extract(filename, '[/\\]versions[/\\]([^/\\]+)[/\\]users\.parquet$$', 1) AS version,
             user_id, embedding::${all_type} AS embedding, n_interactions, reconstruction_error,
             ${all_last} AS last_interaction, event_timestamp, created_timestamp
      FROM read_parquet(${users_all}, filename = true, union_by_name = true)) f
JOIN "${name}_versions" v USING (version);

CREATE OR REPLACE VIEW "${name}_items_all" AS
SELECT f.version, f.item_id, f.embedding, f.bias, f.popularity,
       CASE WHEN v.schema_version = 1 THEN f.event_timestamp ELSE f.last_interaction END AS last_interaction,
       v.valid_from AS event_timestamp, f.created_timestamp, f.folded_in
FROM (SELECT regexp_extract(filename, '[/\\]versions[/\\]([^/\\]+)[/\\]items\.parquet$$', 1) AS version,
             item_id, embedding::${all_type} AS embedding, bias, popularity,
             ${all_last} AS last_interaction, event_timestamp, created_timestamp, ${all_folded} AS folded_in
      FROM read_parquet(${items_all}, filename = true, union_by_name = true)) f
JOIN "${name}_versions" v USING (version);

-- Macros (live version) -------------------------------------------------------------------------
-- An id argument is cast to the id column's type (${user_type} users, ${item_type} items), so the
-- number 38 never matches the string id "0038".
-- Items whose vectors have the largest inner product with `item`'s (as `aefeatures similar`).
CREATE OR REPLACE MACRO "${name}_similar_items"(item, k) AS TABLE
SELECT o.item_id, array_inner_product(q.embedding, o.embedding) AS score
FROM "${name}_items" q, "${name}_items" o
WHERE q.item_id = item::${item_type} AND o.item_id <> item::${item_type}
ORDER BY score DESC, o.item_id LIMIT k;

-- Users whose embeddings are closest to `user`'s by cosine similarity.
CREATE OR REPLACE MACRO "${name}_similar_users"(user, k) AS TABLE
SELECT o.user_id, array_cosine_similarity(q.embedding, o.embedding) AS score
FROM "${name}_users" q, "${name}_users" o
WHERE q.user_id = user::${user_type} AND o.user_id <> user::${user_type}
ORDER BY score DESC, o.user_id LIMIT k;

-- Items for `user`, scored as the model scores them (the item-item part included), items they
-- already have left out (as `aefeatures recommend`).
CREATE OR REPLACE MACRO "${name}_recommend"(user, k) AS TABLE
SELECT i.item_id, ${score} AS score
FROM "${name}_users" u, "${name}_items" i
WHERE u.user_id = user::${user_type}
  AND i.item_id NOT IN (SELECT s.item_id FROM "${name}_interactions" s WHERE s.user_id = user::${user_type})
ORDER BY score DESC, i.item_id LIMIT k;

-- Filtered forms: `keep` is a filter, the same SQL boolean expression over the item attributes
-- (and item_id) that lookups take, written unquoted as an argument. Unlike a lookup's filter it is
-- the query's own SQL, not checked: it can do whatever the query around it can.
--   SELECT * FROM ${name}_recommend_where(42, 10, category = 'books' AND in_stock);
CREATE OR REPLACE MACRO "${name}_recommend_where"(user, k, keep) AS TABLE
SELECT i.item_id, ${score} AS score
FROM "${name}_users" u, "${name}_items" i
WHERE u.user_id = user::${user_type} AND (keep)
  AND i.item_id NOT IN (SELECT s.item_id FROM "${name}_interactions" s WHERE s.user_id = user::${user_type})
ORDER BY score DESC, i.item_id LIMIT k;

CREATE OR REPLACE MACRO "${name}_similar_items_where"(item, k, keep) AS TABLE
SELECT o.item_id, array_inner_product(q.query_embedding, o.embedding) AS score
FROM (SELECT embedding AS query_embedding FROM "${name}_items" WHERE item_id = item::${item_type}) q, "${name}_items" o
WHERE o.item_id <> item::${item_type} AND (keep)
ORDER BY score DESC, o.item_id LIMIT k;

-- Point-in-time: `user`'s embedding in the version whose values were valid at `ts` (none before
-- the first version existed; a version's value never for a time before its valid_from).
CREATE OR REPLACE MACRO "${name}_user_embedding_asof"(user, ts) AS TABLE
SELECT u.user_id, u.version, u.embedding, u.event_timestamp
FROM "${name}_users_all" u JOIN "${name}_versions" v USING (version)
WHERE u.user_id = user::${user_type} AND v.valid_from <= ts::TIMESTAMPTZ
  AND (v.valid_to IS NULL OR ts::TIMESTAMPTZ < v.valid_to);

-- The same for an item.
CREATE OR REPLACE MACRO "${name}_item_embedding_asof"(item, ts) AS TABLE
SELECT i.item_id, i.version, i.embedding, i.bias, i.event_timestamp
FROM "${name}_items_all" i JOIN "${name}_versions" v USING (version)
WHERE i.item_id = item::${item_type} AND v.valid_from <= ts::TIMESTAMPTZ
  AND (v.valid_to IS NULL OR ts::TIMESTAMPTZ < v.valid_to);
