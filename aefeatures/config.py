"""Job configuration: one frozen dataclass per stage, loaded strictly from a TOML job file.

Unknown keys and values of the wrong type are errors that name the key and the file, so a typo
never silently falls back to a default. Relative paths resolve against the job file's folder.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import sys
import types
import typing
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

from aefeatures import errors

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

# A feature set's name starts SQL view names (`<name>_users`) and Feast objects: an identifier
NAME_PATTERN = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
NAME_RULE = "use letters, digits and _ only, starting with a letter or _ (it names SQL views and Feast objects)"
MODEL_KINDS = ("dae", "vae", "dlae", "recvae")
PRECISIONS = ("auto", "fp32", "bf16")
SPARSE_UPDATES = ("auto", "on", "off")
PROTOCOLS = ("held-out items", "held-out users")  # evaluation.protocol
INDEX_KINDS = ("auto", "flat", "hnsw", "ivf", "ivfpq")
TIMESTAMP_UNITS = ("auto", "s", "ms", "us", "ns")
WEIGHT_TRANSFORMS = ("none", "log1p")
# Item attribute columns become columns of the `<name>_items` SQL view and names in lookup
# filters: plain identifiers, none that the view, the users table or the SQL macros use already.
ATTRIBUTE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")
RESERVED_ATTRIBUTES = frozenset({
    "item_id", "user_id", "embedding", "bias", "popularity", "event_timestamp", "created_timestamp",
    "n_interactions", "reconstruction_error", "anomaly_score", "version", "score", "rank", "last_interaction",
    "user", "item", "k", "keep", "ts", "_row",
})


def attribute_name_rule() -> str:
    return ("an attribute column needs a plain name (letters, digits, _; not starting with a digit) "
            f"other than {', '.join(sorted(RESERVED_ATTRIBUTES))}; rename it in the attributes file")


@dataclass(frozen=True)
class JobSection:
    name: str  # feature-set name: NAME_PATTERN
    store: Path  # store directory


@dataclass(frozen=True)
class InputConfig:
    path: str  # a Parquet file, a directory of Parquet files (hive partitions ok) or a glob
    user_col: str = "user_id"
    item_col: str = "item_id"
    weight_col: Optional[str] = None  # optional: explicit feedback or counts
    timestamp_col: Optional[str] = None  # optional: datetime (any unit/zone, Spark INT96), date, or integer epoch
    # Integer epochs: "auto" infers s/ms/us/ns from the magnitude (refusing a column that fits
    # none or several) and records the choice in the manifest; or name the unit.
    timestamp_unit: str = "auto"
    # Event timestamps outside [timestamp_min, timestamp_max) (UTC, ISO 8601) are refused as
    # implausible, never wrapped or clamped. The defaults keep the four epoch units apart.
    timestamp_min: str = "1971-01-01"
    timestamp_max: str = "2100-01-01"
    min_weight: Optional[float] = None  # rows whose weight is below are dropped
    binarize: bool = True  # model input is 1 per (user, item); False feeds the weights themselves
    # With binarize = false: "log1p" feeds log(1 + weight), which tames heavy-tailed counts
    # (plays, clicks, quantities); "none" feeds the weights as they are
    weight_transform: str = "none"


# model.dim = 0 means the kind's own default width: dae and vae keep 64; recvae the paper's latent
# width, 200. A dlae's stays 0 here and follows the data's shape when it is fitted
# (aefeatures.model.dlae_search.dlae_width: full rank up to 2048 where an exact path fits, 1024
# on the sketch path up to 2M interactions, else 256), since its NDCG@100 rises with the width
# up to full rank (BENCHMARKS.md).
DEFAULT_DIMS = {"dae": 64, "vae": 64, "recvae": 200}


@dataclass(frozen=True)
class ModelConfig:
    # "dae" (denoising AE) | "vae" (Mult-VAE) | "dlae" (low-rank denoising linear AE in closed form,
    # Steck 2020: no hidden layer, no epochs; validation picks its dropout) | "recvae" (RecVAE,
    # Shenbin et al. 2020: aefeatures.model.recvae; `hidden` is then its one width H of 5 layers)
    kind: str = "dlae"  # the default by measurement (BENCHMARKS.md, "Quality of every kind")
    dim: int = 0  # bottleneck width = user-embedding size; 0: the kind's default (DEFAULT_DIMS; a dlae's by the data)
    hidden: tuple[int, ...] = (600,)  # encoder hidden layers; the decoder is one linear layer
    epochs: int = 50
    batch_size: int = 512
    lr: float = 1e-3
    weight_decay: float = 0.0
    dropout: float = 0.5  # input dropout, the "denoising" corruption
    l2: float = 100.0  # dlae: the L2 weight λ added to the dropout's penalty
    # dlae: item j's scores are multiplied by (its training users + 1)^-popularity_exponent
    # (its item vector is scaled); with validation the exponent is chosen from a grid that
    # includes this value, as the dropout is
    popularity_exponent: float = 0.0
    # dlae: a sparse item-item part beside the bottleneck (aefeatures.model.neighbours), this many
    # neighbours an item, where the width is below the data's rank; 0 = none. With validation
    # the search tries it on its best fits at each weight of NEIGHBOUR_WEIGHTS and keeps it only
    # where it scores higher; neighbour_weight is then the chosen γ (0: not kept), and without
    # validation the γ fitted (0: none)
    neighbours: int = 64
    neighbour_weight: float = 0.0
    beta_cap: float = 0.2  # vae: KL weight is annealed linearly up to this cap
    anneal_steps: int = 20000  # vae: optimizer steps to reach beta_cap
    # recvae: γ of RecVAE, the KL weight per unit of a user's interaction weight (a user's KL
    # weight is γ × the sum of their weights; the paper's 0.005)
    gamma: float = 0.005
    encoder_passes: int = 3  # recvae: passes updating the encoder before each decoder pass (the paper's 3)
    patience: int = 10  # stop after this many epochs without a better validation NDCG@100; 0 = never
    # Optimizer steps before patience may stop training; the epoch cap is raised to reach them
    # when epochs are a few steps (small data), so small data is not cut off by `epochs`.
    min_steps: int = 1000
    max_minutes: float = 0.0  # wall-clock budget for training (validation and refit); 0 = none
    seed: int = 0
    device: str = "auto"  # "auto" (CUDA when available) | "cpu" | "cuda" | "cuda:N"
    precision: str = "auto"  # "fp32" | "bf16" | "auto": bf16 on CUDA, fp32 on CPU
    compile: bool = False  # torch.compile the model (measured no faster on an H200 at the ML-20M shape)
    full_softmax_max_items: int = 200_000  # above this many items train with a sampled softmax
    sampled_negatives: int = 8192  # sampled softmax: shared negatives per batch
    # "auto": on with the sampled softmax, off with the full one | "on" | "off". On: the input
    # layer and the sampled decoder rows get sparse gradients and a lazy Adam (only the rows a
    # batch touches move), and weight_decay reaches the encoder layers only.
    sparse_updates: str = "auto"
    # CPU threads for training; 0 = those the process may use: its CPU set and cgroup CPU quota,
    # not the host's core count (aefeatures.model.threads). Not part of the input fingerprint.
    threads: int = 0

    def __post_init__(self) -> None:
        if self.dim == 0 and self.kind in DEFAULT_DIMS:
            object.__setattr__(self, "dim", DEFAULT_DIMS[self.kind])


@dataclass(frozen=True)
class EvaluationConfig:
    # "held-out items": every user with 2+ items (at most max_valid_users) validates on hidden
    # items while the model fits everyone's shown items, as a nightly run's users are in its fit;
    # "held-out users": valid_share of the users are left out of the fit and folded in, as new
    # users are. Held-out items chose better on 6 of 7 real sets, 3 seeds each (BENCHMARKS.md,
    # "Which users validate").
    protocol: str = "held-out items"
    valid_share: float = 0.1  # held-out users: the share left out of training; 0 = no evaluation (either protocol)
    max_valid_users: int = 10000  # cap on validation users (they cost a full ranking per epoch)
    holdout: float = 0.2  # share of each validation user's items hidden and ranked
    # Held-out users with refit: hold out at least this many users (at most half of them) when valid_share
    # gives fewer, so that small data stops training on a steady metric (59 users is noise).
    min_valid_users: int = 1000
    # dlae, one process: k >= 2 chooses its (p, λ, β) by k-fold cross-validation over users (every
    # user validates once; the manifest's evaluation.folds says how sure the choice is); 1 = one
    # held-out split. One split by measurement, 3 seeds: 5 folds gave 0.999× a tuned EASE against
    # one split's 1.007× on a 591-user purchase set, 1.038× against 1.034× on a 600-user Last.fm
    # cut: no consistent gain for 5× the fits (BENCHMARKS.md, "Choosing on small data: folds").
    folds: int = 1
    # After validation chose the epochs, train again on every user (the validation users too)
    # for that many epochs and publish that model; the manifest keeps the validation metrics.
    refit: bool = True
    # EASE (Steck 2019) on the same split as a reference, when its system (items, or training
    # users when fewer) is at most this size; 0 = never.
    reference_max_items: int = 15000


@dataclass(frozen=True)
class GateConfig:
    min_ratio: float = 0.9  # refuse below this × the live version's validation NDCG@100; 0 = off
    beat_popularity: bool = True  # refuse when validation NDCG@100 is not above popularity's
    min_vs_reference: float = 0.0  # refuse below this × EASE's validation NDCG@100 (when computed); 0 = off
    max_churn: float = 1.0  # refuse when the mean top-10 churn against the live version exceeds this; 1 = off


@dataclass(frozen=True)
class PublishConfig:
    align: bool = True  # rotate a new model onto the live version's space (orthogonal Procrustes)


@dataclass(frozen=True)
class RetentionConfig:
    keep: int = 0  # published versions to keep (the live one always stays); 0 = keep all


@dataclass(frozen=True)
class IndexConfig:
    kind: str = "auto"  # "auto" | "flat" | "hnsw" | "ivf" | "ivfpq" | a FAISS factory string
    min_recall: float = 0.95  # refuse to publish an approximate index below this recall@10 vs exact


@dataclass(frozen=True)
class ItemsConfig:
    """Optional item attributes (category, price, in_stock, ...) stored with each version and
    usable in lookup filters. Off while ``path`` is unset."""

    path: Optional[str] = None  # Parquet file, directory or glob, like `input.path`
    id_col: str = "item_id"  # the column holding the item id (same ids as the interactions)
    columns: tuple[str, ...] = ()  # attribute columns to keep; empty = every column but id_col


@dataclass(frozen=True)
class JobConfig:
    job: JobSection
    input: InputConfig
    model: ModelConfig = field(default_factory=ModelConfig)
    index: IndexConfig = field(default_factory=IndexConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    gate: GateConfig = field(default_factory=GateConfig)
    retention: RetentionConfig = field(default_factory=RetentionConfig)
    items: ItemsConfig = field(default_factory=ItemsConfig)
    publish: PublishConfig = field(default_factory=PublishConfig)
    source: Optional[Path] = None  # the job file this came from

    def to_dict(self) -> dict[str, Any]:
        """The resolved configuration as plain JSON-able values (written into every manifest)."""
        out = dataclasses.asdict(self)
        out.pop("source")
        if self.items.path is None:  # no [items]: the config (and fingerprint) of jobs without it
            out.pop("items")
        return _jsonable(out)


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def load_job_config(path: Path | str) -> JobConfig:
    """Read and validate a job file.

    Parameters
    ----------
    path
        A TOML file with ``[job]``, ``[input]`` and optional ``[model]``, ``[index]`` sections.

    Raises
    ------
    ConfigError
        The file is missing or not TOML, a key is unknown, or a value has the wrong type or range.
    """
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise errors.job_file_missing(path)
    except (OSError, UnicodeDecodeError) as exc:
        raise errors.job_file_unreadable(path, exc)
    except tomllib.TOMLDecodeError as exc:
        raise errors.job_file_not_toml(path, exc)
    return config_from_dict(raw, path)


def config_from_dict(raw: dict[str, Any], path: Path) -> JobConfig:
    """Build a :class:`JobConfig` from parsed TOML, resolving paths against ``path``'s folder."""
    base = path.resolve().parent
    sections = {k: v for k, v in typing.get_type_hints(JobConfig).items() if k != "source"}
    _reject_unknown(path, "", raw, list(sections))
    for required in ("job", "input"):
        if required not in raw:
            raise errors.missing_section(path, required)
    parts = {}
    for name, cls in sections.items():
        table = raw.get(name, {})
        if not isinstance(table, dict):
            raise errors.wrong_type(path, name, f"a table `[{name}]`", table)
        parts[name] = _build(path, name, cls, table)
    job = dataclasses.replace(parts["job"], store=_resolve(base, parts["job"].store))
    input_cfg = dataclasses.replace(parts["input"], path=_resolve_input(base, parts["input"].path))
    items_cfg = parts["items"] if parts["items"].path is None else \
        dataclasses.replace(parts["items"], path=_resolve_input(base, parts["items"].path))
    cfg = JobConfig(**{**parts, "job": job, "input": input_cfg, "items": items_cfg}, source=path)
    _check_values(path, cfg)
    return cfg


def _resolve(base: Path, value: Path) -> Path:
    value = value.expanduser()
    return value if value.is_absolute() else (base / value).resolve()


def _resolve_input(base: Path, value: str) -> str:
    # Globs stay strings: resolve only the prefix so `../data/*.parquet` works from any cwd.
    value = str(Path(value).expanduser()) if value.startswith("~") else value
    return value if Path(value).is_absolute() else str(base / value)


def _reject_unknown(path: Path, prefix: str, table: dict[str, Any], valid: list[str]) -> None:
    for key in table:
        if key not in valid:
            close = difflib.get_close_matches(key, valid, n=1)
            raise errors.unknown_key(path, prefix + key, valid, prefix + close[0] if close else None)


def _build(path: Path, section: str, cls: type, table: dict[str, Any]) -> Any:
    hints = typing.get_type_hints(cls)
    fields = dataclasses.fields(cls)
    _reject_unknown(path, f"{section}.", table, [f.name for f in fields])
    values = {}
    for fld in fields:
        key = f"{section}.{fld.name}"
        if fld.name in table:
            values[fld.name] = _coerce(path, key, table[fld.name], hints[fld.name])
        elif fld.default is dataclasses.MISSING and fld.default_factory is dataclasses.MISSING:
            raise errors.missing_key(path, key, section)
    return cls(**values)


def _coerce(path: Path, key: str, value: Any, hint: Any) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):  # Optional[X]
        inner = [a for a in args if a is not type(None)][0]
        return _coerce(path, key, value, inner)
    if origin is tuple:
        if not isinstance(value, list):
            raise errors.wrong_type(path, key, "a list such as [600]", value)
        return tuple(_coerce(path, f"{key}[{i}]", v, args[0]) for i, v in enumerate(value))
    if hint is bool:
        if not isinstance(value, bool):
            raise errors.wrong_type(path, key, "true or false", value)
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise errors.wrong_type(path, key, "an integer", value)
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise errors.wrong_type(path, key, "a number", value)
        return float(value)
    if hint in (str, Path):
        if not isinstance(value, str):
            raise errors.wrong_type(path, key, "a string", value)
        return hint(value)
    raise TypeError(f"no coercion for {hint!r}")  # a bug in this module, not in the job file


def _check_values(path: Path, cfg: JobConfig) -> None:
    m = cfg.model
    rules = [
        ("job.name", cfg.job.name, NAME_PATTERN.fullmatch(cfg.job.name), NAME_RULE),
        ("model.kind", m.kind, m.kind in MODEL_KINDS, f"choose one of {', '.join(MODEL_KINDS)}"),
        ("model.dim", m.dim, m.dim >= 0, "it must be at least 1 (or 0: the kind's default)"),
        ("model.hidden", list(m.hidden), all(h >= 1 for h in m.hidden), "every layer needs >= 1 unit"),
        ("model.epochs", m.epochs, m.epochs >= 0, "it must be 0 or more"),
        ("model.batch_size", m.batch_size, m.batch_size >= 1, "it must be at least 1"),
        ("model.lr", m.lr, m.lr > 0, "it must be positive"),
        ("model.l2", m.l2, m.l2 > 0, "it must be positive"),
        ("model.weight_decay", m.weight_decay, m.weight_decay >= 0, "it must be 0 or more"),
        ("model.dropout", m.dropout, 0 <= m.dropout < 1, "it must be in [0, 1)"),
        ("model.popularity_exponent", m.popularity_exponent, 0 <= m.popularity_exponent <= 1, "it must be in [0, 1]"),
        ("model.neighbours", m.neighbours, m.neighbours >= 0, "it must be 0 (none) or more"),
        ("model.neighbour_weight", m.neighbour_weight, m.neighbour_weight >= 0, "it must be 0 (none) or more"),
        ("model.beta_cap", m.beta_cap, m.beta_cap >= 0, "it must be 0 or more"),
        ("model.anneal_steps", m.anneal_steps, m.anneal_steps >= 1, "it must be at least 1"),
        ("model.gamma", m.gamma, m.gamma >= 0, "it must be 0 or more"),
        ("model.encoder_passes", m.encoder_passes, m.encoder_passes >= 1, "it must be at least 1"),
        ("model.patience", m.patience, m.patience >= 0, "it must be 0 or more"),
        ("model.threads", m.threads, m.threads >= 0, "it must be 0 (the CPUs available) or more"),
        ("model.min_steps", m.min_steps, m.min_steps >= 0, "it must be 0 or more"),
        ("model.max_minutes", m.max_minutes, m.max_minutes >= 0, "it must be 0 (no limit) or more"),
        ("evaluation.valid_share", cfg.evaluation.valid_share, 0 <= cfg.evaluation.valid_share < 1,
         "it must be in [0, 1)"),
        ("evaluation.max_valid_users", cfg.evaluation.max_valid_users, cfg.evaluation.max_valid_users >= 1,
         "it must be at least 1"),
        ("evaluation.min_valid_users", cfg.evaluation.min_valid_users, cfg.evaluation.min_valid_users >= 0,
         "it must be 0 or more"),
        ("evaluation.reference_max_items", cfg.evaluation.reference_max_items,
         cfg.evaluation.reference_max_items >= 0, "it must be 0 (no reference) or more"),
        ("gate.min_vs_reference", cfg.gate.min_vs_reference, cfg.gate.min_vs_reference >= 0, "it must be 0 or more"),
        ("evaluation.folds", cfg.evaluation.folds, cfg.evaluation.folds >= 1, "it must be 1 (one split) or more"),
        ("evaluation.protocol", cfg.evaluation.protocol, cfg.evaluation.protocol in PROTOCOLS,
         f"choose one of {', '.join(PROTOCOLS)}"),
        ("evaluation.folds", cfg.evaluation.folds, cfg.evaluation.folds == 1 or cfg.evaluation.protocol == "held-out users",
         'k folds deal the users into k groups held out in turn: set `evaluation.protocol = "held-out users"` too'),
        ("evaluation.holdout", cfg.evaluation.holdout, 0 < cfg.evaluation.holdout < 1, "it must be in (0, 1)"),
        ("retention.keep", cfg.retention.keep, cfg.retention.keep >= 0, "it must be 0 (keep all) or more"),
        ("gate.min_ratio", cfg.gate.min_ratio, cfg.gate.min_ratio >= 0, "it must be 0 or more"),
        ("gate.max_churn", cfg.gate.max_churn, 0 <= cfg.gate.max_churn <= 1, "it must be in [0, 1] (1: off)"),
        ("model.precision", m.precision, m.precision in PRECISIONS, f"choose one of {', '.join(PRECISIONS)}"),
        ("model.full_softmax_max_items", m.full_softmax_max_items, m.full_softmax_max_items >= 1,
         "it must be at least 1"),
        ("model.sampled_negatives", m.sampled_negatives, m.sampled_negatives >= 1, "it must be at least 1"),
        ("model.sparse_updates", m.sparse_updates, m.sparse_updates in SPARSE_UPDATES,
         f"choose one of {', '.join(SPARSE_UPDATES)}"),
        ("model.device", m.device, re.fullmatch(r"auto|cpu|cuda(:\d+)?", m.device),
         "use auto, cpu, cuda or cuda:N"),
        ("index.min_recall", cfg.index.min_recall, 0 <= cfg.index.min_recall <= 1, "it must be in [0, 1]"),
    ]
    for key, value, ok, rule in rules:
        if not ok:
            raise errors.bad_value(path, key, value, rule)
    if m.kind == "recvae":
        _check_recvae(path, m)
    # a dlae of width 0 takes its width from the data: a factory string is checked at the narrow one
    _check_index_kind(path, cfg.index.kind, (cfg.model.dim or 256) + 1)
    if cfg.input.weight_transform not in WEIGHT_TRANSFORMS:
        raise errors.bad_value(path, "input.weight_transform", cfg.input.weight_transform,
                               f"choose one of {', '.join(WEIGHT_TRANSFORMS)}")
    if cfg.input.weight_transform != "none" and (cfg.input.binarize or cfg.input.weight_col is None):
        raise errors.bad_value(path, "input.weight_transform", cfg.input.weight_transform,
                               "it transforms the weights the model reads: set `input.weight_col` and "
                               "`input.binarize = false`, or drop it")
    if cfg.input.min_weight is not None and cfg.input.weight_col is None:
        raise errors.bad_value(path, "input.min_weight", cfg.input.min_weight,
                               "it needs `input.weight_col` to know which column to compare")
    for key in ("user_col", "item_col"):
        if getattr(cfg.input, key) == "":
            raise errors.bad_value(path, f"input.{key}", "", "name a column")
    if cfg.items.path is not None or cfg.items.columns:
        if cfg.items.path is None:
            raise errors.bad_value(path, "items.columns", list(cfg.items.columns),
                                   "it needs `items.path` to know which file to read")
        if cfg.items.id_col == "":
            raise errors.bad_value(path, "items.id_col", "", "name a column")
        for column in cfg.items.columns:
            if not ATTRIBUTE_NAME.fullmatch(column) or column.lower() in RESERVED_ATTRIBUTES:
                raise errors.bad_value(path, "items.columns", column, attribute_name_rule())
    if cfg.input.timestamp_unit not in TIMESTAMP_UNITS:
        raise errors.bad_value(path, "input.timestamp_unit", cfg.input.timestamp_unit,
                               f"choose one of {', '.join(TIMESTAMP_UNITS)}")
    bounds = []
    for key in ("timestamp_min", "timestamp_max"):
        value = getattr(cfg.input, key)
        try:
            bounds.append(timestamp_bound(value))
        except ValueError:
            raise errors.bad_value(path, f"input.{key}", value,
                                   "write an ISO 8601 date or time such as \"2001-01-01\" (UTC)") from None
    if bounds[0] >= bounds[1]:
        raise errors.bad_value(path, "input.timestamp_max", cfg.input.timestamp_max,
                               "it must be later than `input.timestamp_min`")


def _check_recvae(path: Path, m: ModelConfig) -> None:
    """What RecVAE's training (aefeatures.model.recvae) does not do, refused when the job loads."""
    if len(m.hidden) != 1:
        raise errors.bad_value(path, "model.hidden", list(m.hidden),
                               "kind recvae takes one width H for its 5 encoder layers, such as [600]")
    if m.sparse_updates == "on":
        raise errors.bad_value(path, "model.sparse_updates", m.sparse_updates,
                               'kind recvae trains with dense updates; set it to "auto" or "off"')
    if m.compile:
        raise errors.bad_value(path, "model.compile", m.compile, "kind recvae trains without torch.compile; "
                               "set it to false")


def timestamp_bound(value: str) -> datetime:
    """An ISO 8601 date or time as an aware UTC datetime (naive values are taken as UTC)."""
    parsed = datetime.fromisoformat(value)
    return parsed.replace(tzinfo=timezone.utc) if parsed.tzinfo is None else parsed.astimezone(timezone.utc)


def _check_index_kind(path: Path, kind: str, width: int) -> None:
    """A named kind, or a FAISS factory string FAISS can make for ``width``-wide rows (an item's
    vector and bias, which a verbatim string indexes as they are). Only making the index is
    tried, not training it, so this costs milliseconds; FAISS is imported only for a string
    that is not a named kind."""
    if kind in INDEX_KINDS:
        return
    reason = "it is empty"
    if kind.strip():
        import faiss  # here only: loading a job file with a named kind needs no FAISS

        try:
            faiss.index_factory(width, kind, faiss.METRIC_INNER_PRODUCT)
            return
        except RuntimeError as exc:
            reason = str(exc).strip().splitlines()[-1].split("Error: ")[-1][:160]
    name_like = re.fullmatch(r"[A-Za-z_-]+", kind.strip())  # a misspelt name rather than a factory string
    close = difflib.get_close_matches(kind.lower().replace("_", "").replace("-", ""), INDEX_KINDS, n=1) if name_like else []
    raise errors.bad_index_kind(path, kind, width, reason, INDEX_KINDS, close[0] if close else None)
