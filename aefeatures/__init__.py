"""aefeatures: autoencoder embeddings of users and items as a Parquet feature store.

The lookup API imports no torch::

    import aefeatures
    fs = aefeatures.open_store("store")["movies"]
    fs.recommend(42, k=10)
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("aefeatures")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0"

from aefeatures.errors import AEFeaturesError, BadInputError, FilterError, NotFoundError  # noqa: E402
from aefeatures.serving.lookup import FeatureSet, Neighbours, Store, open_store  # noqa: E402

__all__ = ["AEFeaturesError", "BadInputError", "FeatureSet", "FilterError", "Neighbours", "NotFoundError", "Store",
           "open_store", "__version__"]
