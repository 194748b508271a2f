"""Write a Feast feature repository for a feature set's live version.

The tables already follow offline-store conventions (entity key, `event_timestamp`,
`created_timestamp`), so the repository is just definitions: an Entity per id column, a
FileSource per table and a FeatureView with the embedding as ``Array(Float32)``. The sources
point at the live version's files: export again after a publish (e.g. in the same cron line).
"""

from __future__ import annotations

from pathlib import Path

from aefeatures import errors
from aefeatures.store import layout, publish

_ID_TYPES = {"Int64": ("INT64", "Int64"), "String": ("STRING", "String")}

_REPO = '''"""Feast definitions for aefeatures feature set `{name}`, version {version} (generated)."""

from datetime import timedelta

from feast import Entity, FeatureView, Field, FileSource, ValueType
from feast.types import Array, Float32, Int32, {user_type}{extra_type}

user = Entity(name="{name}_user", join_keys=["user_id"], value_type=ValueType.{user_value})
item = Entity(name="{name}_item", join_keys=["item_id"], value_type=ValueType.{item_value})

{name}_users_source = FileSource(
    name="{name}_users",
    path={users!r},
    timestamp_field="event_timestamp",
    created_timestamp_column="created_timestamp",
)
{name}_items_source = FileSource(
    name="{name}_items",
    path={items!r},
    timestamp_field="event_timestamp",
    created_timestamp_column="created_timestamp",
)

{name}_user_embeddings = FeatureView(
    name="{name}_user_embeddings",
    entities=[user],
    ttl=timedelta(days={ttl_days}),
    schema=[
        Field(name="user_id", dtype={user_type}),
        Field(name="embedding", dtype=Array(Float32)),
        Field(name="n_interactions", dtype=Int32),
        Field(name="reconstruction_error", dtype=Float32),
        Field(name="anomaly_score", dtype=Float32),
    ],
    source={name}_users_source,
    tags={{"aefeatures_version": "{version}", "dim": "{dim}"}},
)

{name}_item_embeddings = FeatureView(
    name="{name}_item_embeddings",
    entities=[item],
    ttl=timedelta(days={ttl_days}),
    schema=[
        Field(name="item_id", dtype={item_type}),
        Field(name="embedding", dtype=Array(Float32)),
        Field(name="bias", dtype=Float32),
        Field(name="popularity", dtype=Int32),
    ],
    source={name}_items_source,
    tags={{"aefeatures_version": "{version}", "dim": "{dim}"}},
)
'''

_STORE_YAML = """project: {name}
registry: data/registry.db
provider: local
offline_store:
  type: file
online_store:
  type: sqlite
  path: data/online_store.db
entity_key_serialization_version: 3
"""


def export_feast_repo(root: Path, name: str, output: Path, *, ttl_days: int = 3650) -> list[Path]:
    """Write `feature_store.yaml` and `<name>_features.py` into ``output``; return the paths.
    Raises ``BadInputError`` for a ``name`` that is no feature-set name (it is written into
    Python source) and for ids Feast cannot hold."""
    from aefeatures.config import NAME_PATTERN, NAME_RULE

    if not NAME_PATTERN.fullmatch(name):
        raise errors.BadInputError(f"feature set folder {name!r} in `{root}` is no identifier, so it cannot name Feast "
                                   f"objects: {NAME_RULE}. Rename the folder.")
    version = layout.live_version(root, name)
    folder = layout.version_dir(root, name, version).resolve()
    manifest = layout.read_manifest(folder)
    for kind in ("user", "item"):
        if manifest["id_types"][kind] not in _ID_TYPES:  # UInt64: Feast has no unsigned 64-bit type
            raise errors.BadInputError(
                f"feature set `{name}` has {manifest['id_types'][kind]} {kind} ids, which Feast cannot hold "
                "(its entity keys are INT64 or STRING; hashes >= 2**63 do not fit INT64). Write the ids as "
                "strings in the input to export this feature set to Feast.")
    user_value, user_type = _ID_TYPES[manifest["id_types"]["user"]]
    item_value, item_type = _ID_TYPES[manifest["id_types"]["item"]]
    output.mkdir(parents=True, exist_ok=True)
    repo = _REPO.format(
        name=name, version=version, dim=manifest["dim"], ttl_days=ttl_days,
        users=str(folder / layout.USERS), items=str(folder / layout.ITEMS),
        user_value=user_value, item_value=item_value, user_type=user_type, item_type=item_type,
        extra_type="" if item_type == user_type else f", {item_type}",
    )
    paths = [output / "feature_store.yaml", output / f"{name}_features.py"]
    publish.atomic_write(paths[0], _STORE_YAML.format(name=name))
    publish.atomic_write(paths[1], repo)
    return paths
