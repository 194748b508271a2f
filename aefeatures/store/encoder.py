"""A version's encoder as plain arrays, evaluated in numpy: any interaction history embedded at
request time, without torch and without retraining (the reason to use an autoencoder).

Layout, in a version's ``model/`` folder beside the training side's own weights::

    model/encoder/encoder.json         {"format": 1, "kind", "dim", "n_items", "layers", "norms"}
    model/encoder/input.weight.npy     (n_items, width) float32: the input layer (memory-mapped)
    model/encoder/input.bias.npy       (width,)
    model/encoder/layer.K.weight.npy   (out, in) and layer.K.bias.npy (out,), K = 0, 1, ...
    model/encoder/norm.K.weight.npy    RecVAE's LayerNorms, and norm.K.bias.npy

Only ``.npy`` files, read with ``allow_pickle=False``: opening a version never runs its code.
The computation is :meth:`aefeatures.model.autoencoder.Autoencoder.encode` in eval mode, for
every kind: the history's weights L2-normalised, the input layer's weighted sum of its items'
rows plus the bias, then dae/vae/dlae: tanh and a linear layer per hidden layer (a vae's first
``dim`` outputs, the mean); recvae (Shenbin et al., WSDM 2020): swish, LayerNorm (eps 0.1) and
dense residual connections, then the mean.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from aefeatures import errors

ENCODER_DIR = "encoder"
FORMAT = 1
KINDS = ("dae", "vae", "dlae", "recvae")
LAYER_NORM_EPS = 0.1  # RecVAE's (aefeatures.model.autoencoder.RECVAE_LAYER_NORM_EPS)


def write_encoder(folder: Path, *, kind: str, dim: int, arrays: dict[str, np.ndarray]) -> None:
    """Write ``arrays`` (names as in the module docstring, float32) and ``encoder.json`` into
    ``folder`` (created). Raises ``ValueError`` for a kind or a name this format does not know."""
    if kind not in KINDS:
        raise ValueError(f"no stored encoder for kind {kind!r}")
    layers = sum(name.startswith("layer.") and name.endswith(".weight") for name in arrays)
    norms = sum(name.startswith("norm.") and name.endswith(".weight") for name in arrays)
    expected = {"input.weight", "input.bias", *(f"layer.{k}.{p}" for k in range(layers) for p in ("weight", "bias")),
                *(f"norm.{k}.{p}" for k in range(norms) for p in ("weight", "bias"))}
    if set(arrays) != expected:
        raise ValueError(f"encoder arrays {sorted(arrays)} are not {sorted(expected)}")
    folder.mkdir(parents=True, exist_ok=True)
    for name, array in arrays.items():
        np.save(folder / f"{name}.npy", np.ascontiguousarray(array, dtype=np.float32), allow_pickle=False)
    meta = {"format": FORMAT, "kind": kind, "dim": int(dim), "n_items": int(arrays["input.weight"].shape[0]),
            "layers": layers, "norms": norms}
    (folder / "encoder.json").write_text(json.dumps(meta, indent=2), encoding="utf-8")


MAP_ABOVE = 64 << 20  # bytes: a larger input layer is memory-mapped, a smaller one read whole (as the index)


class Encoder:
    """A stored encoder (:func:`write_encoder`), read without executing anything.

    ``input_weight`` is read whole up to :data:`MAP_ABOVE` bytes and memory-mapped beyond (a
    history reads only its own items' rows, and worker processes share the pages): a mapped
    file truncated in place under its reader would kill the process with SIGBUS, so only a large
    one is mapped (see :func:`aefeatures.store.index.load_index`).
    """

    def __init__(self, folder: Path):
        meta = json.loads((folder / "encoder.json").read_text(encoding="utf-8"))
        if meta.get("format") != FORMAT or meta.get("kind") not in KINDS:
            raise errors.StoreError(f"{folder}: an encoder of format {meta.get('format')!r} and kind "
                                    f"{meta.get('kind')!r}, which this aefeatures does not read; upgrade it.")
        self.kind, self.dim, self.n_items = meta["kind"], int(meta["dim"]), int(meta["n_items"])

        def load(name: str, mmap: bool = False) -> np.ndarray:
            return np.load(folder / f"{name}.npy", mmap_mode="r" if mmap else None, allow_pickle=False)

        self.input_weight = load("input.weight", mmap=(folder / "input.weight.npy").stat().st_size > MAP_ABOVE)
        self.input_bias = load("input.bias").astype(np.float64)
        self.layers = [(load(f"layer.{k}.weight").astype(np.float64), load(f"layer.{k}.bias").astype(np.float64))
                       for k in range(int(meta["layers"]))]
        self.norms = [(load(f"norm.{k}.weight").astype(np.float64), load(f"norm.{k}.bias").astype(np.float64))
                      for k in range(int(meta["norms"]))]

    @classmethod
    def open(cls, model_dir: Path, name: str, version: str) -> "Encoder":
        """The encoder of the version whose ``model/`` folder is ``model_dir``; raises
        ``StoreError`` (one line, what to do) for a version published without one."""
        folder = model_dir / ENCODER_DIR
        if not (folder / "encoder.json").is_file():
            raise errors.StoreError(f"version {version} of {name!r} was published without a stored encoder (by an "
                                    "older aefeatures), so it cannot embed a history; publish a new version with "
                                    f"`aefeatures run --force JOB.toml`.")
        return cls(folder)

    def embed(self, indptr: np.ndarray, items: np.ndarray, values: np.ndarray) -> np.ndarray:
        """(n, dim) float32 embeddings of n histories given as a CSR: ``indptr`` (n + 1,) int64,
        ``items`` (nnz,) item rows, ``values`` (nnz,) weights as the model reads them (the job's
        input encoding already applied). A history with no items embeds as the bias alone."""
        n = len(indptr) - 1
        lengths = np.diff(indptr)
        owner = np.repeat(np.arange(n), lengths)
        values = np.asarray(values, dtype=np.float64)
        norms = np.sqrt(np.bincount(owner, weights=values ** 2, minlength=n))
        weights = values / np.maximum(norms, 1e-12)[owner]
        h = np.zeros((n, self.input_weight.shape[1]), dtype=np.float64)
        rows = np.asarray(self.input_weight[np.asarray(items, dtype=np.int64)], np.float64) * weights[:, None]
        filled = lengths > 0
        if filled.any():  # each history's weighted sum of its rows (the entries are grouped by history)
            h[filled] = np.add.reduceat(rows, indptr[:-1][filled], axis=0)
        h += self.input_bias
        if self.kind == "recvae":
            h = _layer_norm(_swish(h), *self.norms[0])
            earlier = h
            for (weight, bias), norm in zip(self.layers[:-1], self.norms[1:]):
                h = _layer_norm(_swish(h @ weight.T + bias + earlier), *norm)
                earlier = earlier + h
            weight, bias = self.layers[-1]
            h = h @ weight.T + bias
        else:
            for weight, bias in self.layers:
                h = np.tanh(h) @ weight.T + bias
        return np.ascontiguousarray(h[:, : self.dim], dtype=np.float32)  # a vae's (and recvae's) mean


def _swish(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def _layer_norm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    mean = x.mean(axis=1, keepdims=True)
    var = x.var(axis=1, keepdims=True)
    return (x - mean) / np.sqrt(var + LAYER_NORM_EPS) * weight + bias
