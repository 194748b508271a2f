"""aefeatures: autoencoder embeddings of users and items as a Parquet feature store.

The lookup API imports no torch::

    import aefeatures
    fs = aefeatures.open_store("store")["movies"]
    fs.recommend(42, k=10)

The public names are imported on first use (a module ``__getattr__``, PEP 562), so
``import aefeatures`` and ``aefeatures --help`` load neither FAISS, Polars nor PyArrow.
"""

from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

try:
    __version__ = version("aefeatures")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0"

_PUBLIC = {  # name -> the module that defines it
    "AEFeaturesError": "aefeatures.errors",
    "BadInputError": "aefeatures.errors",
    "NotFoundError": "aefeatures.errors",
    "FilterError": "aefeatures.errors",
    "InvalidIdError": "aefeatures.errors",
    "VersionGoneError": "aefeatures.errors",
    "FeatureSetNotFoundError": "aefeatures.errors",
    "FeatureSet": "aefeatures.serving.lookup",
    "Neighbours": "aefeatures.serving.lookup",
    "Store": "aefeatures.serving.lookup",
    "open_store": "aefeatures.serving.lookup",
}

__all__ = ["AEFeaturesError", "BadInputError", "FeatureSet", "FeatureSetNotFoundError", "FilterError", "InvalidIdError",
           "Neighbours", "NotFoundError", "Store", "VersionGoneError", "open_store", "__version__"]

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from aefeatures.errors import (
        AEFeaturesError,
        BadInputError,
        FeatureSetNotFoundError,
        FilterError,
        InvalidIdError,
        NotFoundError,
        VersionGoneError,
    )
    from aefeatures.serving.lookup import FeatureSet, Neighbours, Store, open_store


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'aefeatures' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(_PUBLIC[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))
