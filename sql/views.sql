-- DuckDB views over the live version of feature set `${name}` (rendered by aefeatures at each
-- publish into STORE/catalog.sql; run `duckdb -init STORE/catalog.sql` to get them).
-- `embedding` is cast to FLOAT[${dim}] so array_cosine_similarity / array_inner_product work.
-- A user's model score for an item is array_inner_product(u.embedding, i.embedding) + i.bias.

CREATE OR REPLACE VIEW ${name}_users AS
SELECT user_id,
       embedding::FLOAT[${dim}] AS embedding,
       n_interactions,
       reconstruction_error,
       event_timestamp,
       created_timestamp
FROM read_parquet(${users});

CREATE OR REPLACE VIEW ${name}_items AS
SELECT item_id,
       embedding::FLOAT[${dim}] AS embedding,
       bias,
       popularity,
       event_timestamp,
       created_timestamp
FROM read_parquet(${items});

CREATE OR REPLACE VIEW ${name}_interactions AS
SELECT user_id, item_id, weight
FROM read_parquet(${interactions});
