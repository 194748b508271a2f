"""A low-rank linear autoencoder in closed form: the rank-`dim` denoising linear autoencoder
(DLAE) of Steck, "Autoencoders that don't overfit towards the Identity", NeurIPS 2020, fitted
on the CPU or a GPU, in one process or across torch.distributed ranks.

DLAE minimises the expected loss of reconstructing X from a copy with each entry dropped with
probability p, which is a weighted L2 penalty:

    min_B ||X - X B||² + ||Λ^½ B||²,   Λ = diag(p/(1-p) · diag(XᵀX) + λ),   rank(B) ≤ d

With G = XᵀX and M = G + Λ = L Lᵀ the objective is ||LᵀB - L⁻¹G||² plus a constant, so the
rank-d optimum is B = L⁻ᵀ [L⁻¹G]_d (Eckart–Young). With V_d the top-d eigenvectors of
(L⁻¹G)ᵀ(L⁻¹G) = G M⁻¹ G, that is

    B = P Rᵀ,   R = V_d (items × d, orthonormal),   P = M⁻¹ G V_d.

In the product's terms the user embedding is the bottleneck x P (d wide), the item vectors are
R's rows and the score of item j is exactly x P · R[j], so the FAISS inner-product index returns
the model's own top-k, and any new user is embedded by one product.

How a fit is computed (:class:`Solver`; one per set of users, shared by the fits of a search):

- ``"items"`` (exact): the Gram G once per solver; per fit one Cholesky of Ĝ + I (Ĝ = Λ^-½ G
  Λ^-½, well conditioned) and its inverse, which give G M⁻¹ G as one dense matrix, then a block
  subspace iteration on it (one dense product per pass); up to :data:`DIRECT_MAX_ITEMS` items
  its eigendecomposition instead. Used when the catalogue is the small side.
- ``"users"`` (exact, one process): the same operator through the users' kernel
  K = X Λ⁻¹ Xᵀ (push-through identity: G M⁻¹ G = Xᵀ K (K + I)⁻¹ X, M⁻¹ G = Λ⁻¹ Xᵀ (K + I)⁻¹ X),
  one Cholesky of K + I per fit, and the iteration in user space (blocks users × q kept
  orthonormal in the inner product of H = X Xᵀ, so no item-sized block is ever formed). Used
  when the users are the small side (Last.fm).
- ``"sketch"`` (large): Ĝ's top ``OVERSAMPLE × d`` eigenpairs by block subspace iteration with
  sparse products only (Halko et al. 2011), then the rank-d optimum within them. Used when
  both sides are large (ML-20M) and under torch.distributed beyond the Gram's size.

Above :data:`DIRECT_MAX_ITEMS` no dense eigendecomposition of a whole side is taken (two items³
eighs a fit made the previous engine 9.6× a whole EASE grid on the ML-1M shape): a Cholesky
costs a twentieth of one. Every iteration starts from
the previous fit's subspace (a search's fits differ a little in Λ) and stops once the top-d Ritz
values, whose sum is the part of the objective the fit captures, change by less than
:data:`TOLERANCE`. The large products run in float32 on the solver's device; the small
(q × q) problems in float64. Sums over users (G, K's pieces, Xᵀ(·), column norms, counts) go
through ``reduce``: under torch.distributed each rank holds its own users and ``reduce`` is an
all-reduce, so every rank ends with the same factors.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from aefeatures import errors
from aefeatures.data.matrix import CSR

Reduce = Callable[[torch.Tensor], torch.Tensor]  # the sum of a tensor over all ranks (in place allowed)

# Exact paths while the smaller side is at most this (users for "users", items for "items"); the
# Cholesky of that side costs side³/3 per fit. Above it the sketch path. Re-measured on 2 cores:
# BENCHMARKS.md, "The dlae engine".
EXACT_MAX_SIDE = 8192
# On a GPU the Cholesky and the block products of a 32k side take well under a second (an fp32
# 32k³/3 is ~11 TFLOP), and its three squares take 12 GiB: exact up to there.
EXACT_MAX_SIDE_CUDA = 32768
# components of Ĝ per bottleneck unit on the sketch path. On Last.fm at dim 256, 2 × 256
# components gave NDCG@100 0.3703 and 4 × 256 0.3698 against 0.3705 for the exact factors.
OVERSAMPLE = 2
# The exact paths' block: 1.25 × dim columns. Its oversampling only speeds convergence (the
# answer is the exact rank-dim optimum either way); measured on ML-100k, Last.fm and the ML-1M
# shape, 1.25 against 2 gave the same validation NDCG@100 within 0.0004 and a default training
# 14-55% shorter (BENCHMARKS.md, "The dlae engine").
EXACT_OVERSAMPLE = 1.25
TOLERANCE = 1e-3  # relative change of the top-d Ritz values' sum that ends a fit's iteration
# The users path's tolerance is this share of TOLERANCE: its passes cost (users² · q, no item-sized
# block) a tenth of a fit's other work, and at 1e-3 Last.fm lost 0.0005 of validation NDCG@100
USERS_TOLERANCE_SHARE = 0.1
MAX_ITERATIONS = 30  # exact paths: cold starts take 5-7 passes, warm starts 2-3
# Up to this many items the items path takes the eigendecomposition of its m × m operator
# instead of iterating (under 0.2 s at 1,024 on 2 cores): exact, and the same whatever the start.
DIRECT_MAX_ITEMS = 1024
# The sketch path's passes each cost two sparse products over every entry, and its weak
# directions creep (0.1-0.5% a pass at the ML-20M shape) long after NDCG@100 has settled: there
# 2 passes from the sample's subspace gave validation NDCG@100 0.3811, 5 gave 0.3818 and 9
# 0.3819. So a warm start takes at most 3 passes and a cold one at most 6, as a randomized SVD
# with 4-5 power iterations would (Halko et al. 2011).
SKETCH_PASSES = {"cold": 6, "warm": 3}
TEMPERATURES = tuple(2.0 ** k for k in range(0, 16))
MAX_BYTES = 20 << 30  # working memory a fit may take on a host; above it `check_fits` refuses
DENSE_BLOCK = 4096  # rows of a dense block when a Gram or kernel is summed from sparse products
# Above this share of non-zero entries the Gram is summed as dense GEMMs over blocks of users
# (2·users·items² FLOPs at the GEMM rate) rather than as sparse products (2·nnz·items at the
# sparse rate, ~50× slower a FLOP here): on a 6k × 3.7k film-shaped set (4.4%) 0.7 against 1.7 s.
DENSE_GRAM_DENSITY = 0.02
# Users' kernels as one sparse × sparse product below this share of a dense product's work
# (Σ_j users_j² against nnz × users): 0.05 on Last.fm (4× faster sparse), 0.29 on a Zipf
# catalogue (1-3× slower sparse).
SPARSE_KERNEL_SHARE = 0.1
SPMM_COLUMNS = 128  # columns of a dense block per sparse product on a CPU (:func:`spmm`)


def block_width(dim: int, side: int, oversample: float = OVERSAMPLE) -> int:
    """Columns of the subspace a fit iterates on: ``oversample × dim``, at most the side."""
    return max(1, min(int(oversample * dim), side))


def choose_method(n_users: int, n_items: int, *, distributed: bool = False, cuda: bool = False) -> str:
    """``"users"``, ``"items"`` or ``"sketch"`` (module docstring) for a fit on this many users
    and items: the exact path on the smaller side while it is at most :data:`EXACT_MAX_SIDE`
    (:data:`EXACT_MAX_SIDE_CUDA` on a GPU; items only under torch.distributed, where each rank
    holds a share of the users)."""
    limit = EXACT_MAX_SIDE_CUDA if cuda else EXACT_MAX_SIDE
    if n_items <= limit and (n_items <= n_users or distributed):
        return "items"
    if n_users <= limit and not distributed:
        return "users"
    return "sketch"


def working_bytes(n_users: int, n_items: int, dim: int, nnz: int, *, method: str) -> int:
    """Bytes a fit on ``method``'s path takes at most, roughly: the sparse matrix and its
    transpose (12 bytes an entry each), the dense side's square three times (Gram or kernel,
    its scaled copy and its Cholesky factor) and eight item × q and two user × q float32 blocks
    (at 1M items and q 512 the process peaked at 16.5 GB: ``benchmarks/large_catalogue.py --dlae``)."""
    q = block_width(dim, n_items) if method == "sketch" else \
        block_width(dim, min(n_users, n_items), EXACT_OVERSAMPLE)
    side = {"items": n_items, "users": n_users}.get(method, 0)
    return 24 * nnz + 12 * side * side + 4 * q * (8 * n_items + 2 * n_users)


def check_fits(n_users: int, n_items: int, dim: int, nnz: int, *, method: str, limit: int | None = None) -> None:
    """Refuse (``BadInputError``, one line naming the limit and the knobs) a dlae whose fit on
    ``method``'s path would take more than :data:`MAX_BYTES` (or ``limit``: a GPU's free
    memory); never a silent change of model."""
    need, limit = working_bytes(n_users, n_items, dim, nnz, method=method), limit or MAX_BYTES
    if need > limit:
        raise errors.BadInputError(
            f"a dlae of dim {dim} on {n_users:,} users x {n_items:,} items needs ~{need / 2**30:.1f} GiB of working "
            f"memory, above its limit of {limit / 2**30:.0f} GiB: lower `model.dim`, run under torchrun (each rank "
            'holds a share of the users), or set `model.kind = "dae"` (trained in batches, any catalogue size)')


@dataclass
class Warm:
    """What a solver hands to the next solver on a superset of its users (the refit on every
    user after a search): its last subspace, and on the items path its Gram, the rows it summed
    and their entries, so only the new users' products are added. The Gram is not reused where
    those rows hold other entries now (a search fitted without each validation user's hidden
    items, a refit with them)."""

    start: torch.Tensor | None  # None after a direct (eigendecomposed) fit
    gram: torch.Tensor | None
    rows: np.ndarray
    entries: int = 0  # this rank's interactions in ``rows`` when the Gram was summed


@dataclass
class Factors:
    """One fit's (P, R), each (n_items, dim) float32 on the solver's device, and its account."""

    p: torch.Tensor
    r: torch.Tensor
    method: str
    iterations: int
    seconds: float
    flops: float  # the floating-point operations of the fit's products and factorizations
    reduced_bytes: int = 0  # what this rank sent into all-reduces for the fit (0 in one process)


class Solver:
    """The fits of a dlae on one set of users (``rows`` of ``csr``), sharing what does not
    depend on (p, λ): the sparse matrix and its transpose on ``device``, the item column
    norms, the Gram (``"items"``) and the previous fit's subspace, the next fit's start.

    ``reduce`` sums a tensor over torch.distributed ranks (each rank passing its own users);
    None in one process. ``seed`` fixes the first fit's random start (the same on every rank),
    unless ``warm`` (another solver's :meth:`warm`) is given. ``method`` forces a
    path (default :func:`choose_method`).
    Raises ``BadInputError`` from :func:`check_fits` when the fit would not fit in memory.
    """

    def __init__(self, csr: CSR, rows: np.ndarray, n_items: int, *, dim: int, device: torch.device | str = "cpu",
                 seed: int = 0, reduce: Reduce | None = None, method: str | None = None,
                 warm: Warm | None = None):
        self.device, self.dim, self.n_items, self.seed = torch.device(device), dim, n_items, seed
        self.reduce, self.reduced_bytes = reduce, 0  # bytes summed over the ranks so far (each rank's share)
        offsets, items, values = csr.gather(rows)
        n_local, self.entries = len(rows), len(items)
        totals = self._sum(torch.tensor([float(n_local), float(len(items))], dtype=torch.float64))
        self.n_users, nnz = int(totals[0]), int(totals[1])
        cuda = self.device.type == "cuda"
        self.method = method or choose_method(self.n_users, n_items, distributed=reduce is not None, cuda=cuda)
        check_fits(self.n_users, n_items, dim, nnz, method=self.method,
                   limit=int(0.9 * torch.cuda.mem_get_info(self.device)[0]) if cuda else None)
        self.q = block_width(dim, n_items) if self.method == "sketch" else \
            block_width(dim, min(self.n_users, n_items), EXACT_OVERSAMPLE)
        values64 = values.astype(np.float64)
        self.colsq = self._sum(torch.from_numpy(np.bincount(items, weights=values64 ** 2, minlength=n_items)))
        self.x, self.xt = csr_pair(offsets, items, values, n_local, n_items, self.device)
        self.rows, self.gram = rows, None
        self.trace: list[float] = []  # the last fit's top-d Ritz value sums, a pass each
        self.flops_gram = 0.0
        self.nnz = nnz
        # (n_items, q) orthonormal, the last fit's Ritz vectors: the next fit's start; on the users
        # path (W, H W), W (n_users, q) H-orthonormal, instead
        self.start, self.user_start, self.h_basis = None, None, None
        if warm is not None and warm.start is not None and tuple(warm.start.shape) == (n_items, self.q):
            self.start = warm.start.to(self.device)
        if self.method == "items" and warm is not None and warm.gram is not None:
            new = np.setdiff1d(rows, warm.rows, assume_unique=True)
            entries = int((csr.indptr[warm.rows + 1] - csr.indptr[warm.rows]).sum())
            # 0 where rows hold warm's rows, with the entries its Gram summed
            others = float(len(new) + len(warm.rows) != len(rows) or entries != warm.entries)
            if float(self._sum(torch.tensor([others], dtype=torch.float64))[0]) == 0:  # on every rank
                extra = csr_pair(*csr.gather(new), len(new), n_items, self.device)
                self.gram = warm.gram.to(self.device) + self._sum(_gram(*extra, self.device))

    def warm(self) -> Warm:
        """This solver's state for a solver on a superset of its users (:class:`Warm`)."""
        start = self.start
        if start is None and self.user_start is not None:  # the users path's Ritz vectors, in item space
            start = spmm(self.xt, self.user_start[0])
        return Warm(start, self.gram if self.method == "items" else None, self.rows, self.entries)

    def _sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.reduce is None:
            return tensor
        self.reduced_bytes += tensor.numel() * tensor.element_size()
        return self.reduce(tensor)

    def penalty(self, dropout: float, l2: float) -> torch.Tensor:
        """Λ's diagonal, p/(1-p) · diag(G) + λ: (n_items,) float64 on the solver's device."""
        return (dropout / (1.0 - dropout) * self.colsq + l2).to(self.device)

    def item_gram(self) -> torch.Tensor:
        """G = XᵀX over the solver's users (every rank's summed), (n_items, n_items) float32
        dense on its device: the items path's own Gram, computed once; on the other paths
        computed on each call and not kept."""
        if self.method == "items":
            if self.gram is None:
                self.gram = self._sum(_gram(self.x, self.xt, self.device))
                self.flops_gram = 2.0 * self.nnz * self.n_items
            return self.gram
        return self._sum(_gram(self.x, self.xt, self.device))

    def fit(self, dropout: float, l2: float) -> Factors:
        """The rank-``dim`` DLAE at dropout p = ``dropout`` in [0, 1) and λ = ``l2`` > 0.
        When the data's rank is below ``dim`` the last columns are zero."""
        started, reduced = time.perf_counter(), self.reduced_bytes
        lam = self.penalty(dropout, l2)
        solve = {"sketch": self._sketch, "users": self._users, "items": self._exact}[self.method]
        p, r, iterations, flops = solve(lam)
        out_p = torch.zeros(self.n_items, self.dim, dtype=torch.float32, device=self.device)
        out_r = torch.zeros_like(out_p)
        out_p[:, : p.shape[1]], out_r[:, : r.shape[1]] = p, r
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return Factors(out_p, out_r, self.method, iterations, time.perf_counter() - started, flops,
                       self.reduced_bytes - reduced)

    # -- the exact paths: subspace iteration on G M⁻¹ G -------------------------------------

    def _exact(self, lam: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int, float]:
        m, q, d = self.n_items, self.q, min(self.dim, self.q)
        root = lam.sqrt().float()  # Λ^½
        if self.gram is None:
            self.gram = self._sum(_gram(self.x, self.xt, self.device))
            self.flops_gram = 2.0 * self.nnz * m
        # With Ĝ = Λ^-½ G Λ^-½ and Ĝ + I = C Cᵀ (eigenvalues >= 1: float32 is safe),
        # G M⁻¹ G = G - Λ + Λ M⁻¹ Λ = G - Λ + Λ^½ (Ĝ+I)⁻¹ Λ^½: one Cholesky and its inverse,
        # then every step is one dense product; M⁻¹ G R = Λ⁻¹ (G - G M⁻¹ G) R.
        operator = self.gram / root[:, None]
        operator /= root[None, :]
        operator.diagonal().add_(1.0)
        operator = torch.cholesky_inverse(torch.linalg.cholesky(operator))
        operator *= root[:, None]
        operator *= root[None, :]
        operator += self.gram
        operator.diagonal().sub_(lam.float())

        if m <= DIRECT_MAX_ITEMS:  # small: the operator's own eigendecomposition, exact at once
            values, vectors = torch.linalg.eigh(operator.double())
            r = vectors[:, torch.argsort(values, descending=True)[:d]].float()
            p = (self.gram @ r - operator @ r) / lam.float()[:, None]
            flops, self.flops_gram = self.flops_gram + 10.0 * m ** 3, 0.0
            return p, r, 1, flops

        def apply(v: torch.Tensor) -> torch.Tensor:
            return operator @ v

        per_step, setup = 2.0 * m * m * q, m ** 3
        basis, rotation, _, iterations = self._iterate(apply, d)
        r = basis @ rotation[:, :d]
        p = (self.gram @ r - operator @ r) / lam.float()[:, None]  # M⁻¹ G R
        flops = self.flops_gram + setup + per_step * (iterations + 0.5) + 4.0 * m * q * q * iterations
        self.flops_gram = 0.0  # counted once, by the fit that computed the Gram
        return p, r, iterations, flops

    def _users(self, lam: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int, float]:
        """The exact path in user space. With H = X Xᵀ and S = K (K + I)⁻¹ (K = X Λ⁻¹ Xᵀ), the
        operator is G M⁻¹ G = Xᵀ S X; its eigenvectors with nonzero eigenvalues are Xᵀ w for
        S H w = σ w, wᵀ H w = 1. So the subspace iteration runs on (users × q) blocks kept
        H-orthonormal, each pass one product with H and one Cholesky solve, never an item-sized
        block (the item side is the large one here)."""
        n, q, d = self.n_users, self.q, min(self.dim, self.q)
        if self.gram is None:  # H, shared by the fits
            self.gram = _kernel(self.x, self.xt, torch.ones(self.n_items, device=self.device), self.device)
            self.flops_gram = 2.0 * self.nnz * n
        inv = (1.0 / lam).float()
        kernel = _kernel(self.x, self.xt, inv, self.device)  # K = X Λ⁻¹ Xᵀ (users × users)
        kernel.diagonal().add_(1.0)
        factor = torch.linalg.cholesky(kernel)  # K + I = L Lᵀ, eigenvalues >= 1: float32 is safe
        del kernel
        h = self.gram

        def s_apply(hw: torch.Tensor) -> torch.Tensor:  # S y = y - (K + I)⁻¹ y
            return hw - torch.cholesky_solve(hw, factor)

        last, iterations, self.trace = None, 0, []
        direct = q >= n  # the block is the whole user space: the full-rank DLAE, its Ritz pairs at once
        if direct:
            w, hw = self._h_basis()
            image = s_apply(hw)
            values, vectors, captured = _rayleigh_ritz(hw, image, d)
            self.trace, iterations = [captured], 1
        elif self.user_start is not None:
            w, hw = self.user_start
        else:  # from item space: the handed-over subspace (or a random one) mapped by X
            w = spmm(self.x, self.start if self.start is not None else self._random_start())
            w, hw = _h_orthonormal(w, h @ w)
        while not direct:
            image = s_apply(hw)  # the next block; Vᵀ A V = (Hw)ᵀ S (Hw) with V = Xᵀ w
            iterations += 1
            values, vectors, captured = _rayleigh_ritz(hw, image, d)
            self.trace.append(captured)
            if _settled(captured, last, USERS_TOLERANCE_SHARE * TOLERANCE) or iterations >= MAX_ITERATIONS:
                break
            last = captured
            w, hw = _h_orthonormal(image, h @ image)
        rotation = vectors.float()
        w, hw = w @ rotation, hw @ rotation  # the Ritz vectors in user space, still H-orthonormal
        self.user_start, self.start = (w, hw), None
        r = spmm(self.xt, w[:, :d])  # Xᵀ W: orthonormal item vectors
        p = spmm(self.xt, torch.cholesky_solve(hw[:, :d], factor)) * inv[:, None]  # Λ⁻¹ Xᵀ (K+I)⁻¹ X R
        flops = (self.flops_gram + 2.0 * self.nnz * n + n ** 3 / 3 + (4.0 * n * n * q + 4.0 * n * q * q) * iterations
                 + 4.0 * self.nnz * d + 2.0 * n * n * d)
        self.flops_gram = 0.0
        return p, r, iterations, flops

    def _h_basis(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(W, H W) for the whole user space: W = U D^-½ over H = X Xᵀ = U D Uᵀ's nonzero
        eigenvalues, H-orthonormal (Wᵀ H W = I), computed once per solver (H does not depend on
        the fit). Users whose rows are combinations of others' add no column."""
        if self.h_basis is None:
            values, vectors = torch.linalg.eigh(self.gram.double())
            keep = values > 1e-10 * float(values.max().clamp_min(1e-300))
            vectors, values = vectors[:, keep], values[keep]
            self.h_basis = ((vectors * values.rsqrt()).float(), (vectors * values.sqrt()).float())
            self.flops_gram += 9.0 * self.n_users ** 3
        return self.h_basis

    def _iterate(self, apply: Callable[[torch.Tensor], torch.Tensor], d: int, *, passes: int | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """Block subspace iteration with Rayleigh–Ritz on the symmetric PSD operator ``apply``
        from the last fit's subspace or a seeded random one, until the sum
        of the top ``d`` Ritz values settles (or ``passes`` passes are done): the final orthonormal block V (n_items, q), the
        q × q float32 rotation to its Ritz vectors and their Ritz values (q,) float64, both in
        descending order, and the number of operator applications."""
        v = self.start if self.start is not None else _orthonormal(self._random_start())
        last, iterations, self.trace = None, 0, []
        while True:
            image = apply(v)
            iterations += 1
            values, vectors, captured = _rayleigh_ritz(v, image, d)
            self.trace.append(captured)
            if _settled(captured, last, TOLERANCE) or iterations >= min(passes or MAX_ITERATIONS, MAX_ITERATIONS):
                break
            last = captured
            v = _orthonormal(image)
        rotation = vectors.float()
        self.start = v @ rotation  # the Ritz vectors, in order: the next fit's start
        return v, rotation, values, iterations

    def _random_start(self) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed)
        return torch.randn(self.n_items, self.q, generator=generator).to(self.device)

    # -- the sketch path: Ĝ's top components, then the rank-d optimum within them -----------

    def _sketch(self, lam: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int, float]:
        m, q = self.n_items, self.q
        inv_root = lam.rsqrt().float()  # Λ^-½

        def apply(v: torch.Tensor) -> torch.Tensor:  # Ĝ v = Λ^-½ Xᵀ X Λ^-½ v
            return self._sum(spmm(self.xt, spmm(self.x, inv_root[:, None] * v))) * inv_root[:, None]

        passes = SKETCH_PASSES["warm" if self.start is not None else "cold"]
        basis, rotation, e, iterations = self._iterate(apply, self.dim, passes=passes)
        w = basis @ rotation  # (m, q) Ĝ's top eigenvectors, e (q,) their eigenvalues (Ritz values)
        keep = e > 1e-9 * e.max().clamp_min(1e-300)
        e, w = e[keep], w[:, keep.to(w.device)]
        root = lam.sqrt().float()
        # L⁻¹G restricted to these components is W Z, Z = diag(f) Wᵀ Λ^½, f = e/√(e+1); its
        # top-d SVD Z = Q S Rᵀ gives R = Zᵀ Q S⁻¹ and P = Λ^-½ W diag(1/√(e+1)) Q S (Λ's scaling
        # is why the eigenvectors of Ĝ alone are not the answer).
        f = (e / (e + 1).sqrt()).to(self.device)
        weighted = w * root[:, None]
        zz = f[:, None] * (weighted.T @ weighted).double() * f[None, :]
        s2, qv = torch.linalg.eigh(zz)
        order = torch.argsort(s2, descending=True)[: self.dim]
        s, qv = s2[order].clamp_min(1e-300).sqrt(), qv[:, order]
        r = weighted @ (f[:, None] * qv / s).float()
        p = (w / root[:, None]) @ ((qv * s) / (e.to(self.device) + 1).sqrt()[:, None]).float()
        flops = (4.0 * self.nnz * q + 4.0 * m * q * q) * iterations + 6.0 * m * q * q
        return p, r, iterations, flops


def _rayleigh_ritz(basis: torch.Tensor, image: torch.Tensor, d: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(Ritz values (q,) float64, their q × q vectors, both in descending order, and the sum of
    the top ``d`` values clamped at 0) of the operator restricted to a block: ``basis``ᵀ ``image``
    with ``image`` the operator applied to the (orthonormal) basis."""
    h = (basis.T @ image).double()
    values, vectors = torch.linalg.eigh((h + h.T) / 2)
    order = torch.argsort(values, descending=True)
    values, vectors = values[order], vectors[:, order]
    return values, vectors, float(values[:d].clamp_min(0).sum())


def _settled(captured: float, last: float | None, tolerance: float) -> bool:
    """Whether the captured sum changed by at most ``tolerance`` of itself since the last pass."""
    return last is not None and abs(captured - last) <= tolerance * max(captured, 1e-300)


def spmm(sparse: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
    """``sparse @ dense`` (CSR × dense, float32), :data:`SPMM_COLUMNS` columns of ``dense`` at a
    time: the rows of ``dense`` a block reads then stay in cache (Xᵀ T at the ML-20M shape's
    30,000-user sample, q = 512: 0.43 against 0.90 s on 2 cores; X V the same either way)."""
    if dense.shape[1] <= SPMM_COLUMNS or sparse.device.type == "cuda":
        return sparse @ dense
    return torch.cat([sparse @ dense[:, i:i + SPMM_COLUMNS].contiguous()
                      for i in range(0, dense.shape[1], SPMM_COLUMNS)], dim=1)


def csr_pair(offsets: np.ndarray, items: np.ndarray, values: np.ndarray, n_rows: int, n_items: int,
              device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """X (n_rows × n_items) and Xᵀ as float32 sparse CSR tensors on ``device``: the products a
    fit needs are then all CSR × dense, the fast kernel on CPUs and GPUs."""
    crow = np.append(offsets, len(items)).astype(np.int64)
    rows = np.repeat(np.arange(n_rows, dtype=np.int64), np.diff(crow))
    order = np.argsort(items, kind="stable")  # by item, then user: Xᵀ's CSR order
    tcrow = np.zeros(n_items + 1, np.int64)
    np.cumsum(np.bincount(items, minlength=n_items), out=tcrow[1:])
    vals = torch.from_numpy(values.astype(np.float32))
    with warnings.catch_warnings():  # "sparse CSR support is in beta": its products are what a fit uses
        warnings.simplefilter("ignore", UserWarning)
        x = torch.sparse_csr_tensor(torch.from_numpy(crow), torch.from_numpy(items.astype(np.int64)), vals,
                                    (n_rows, n_items), check_invariants=False)
        xt = torch.sparse_csr_tensor(torch.from_numpy(tcrow), torch.from_numpy(rows[order]), vals[order],
                                     (n_items, n_rows), check_invariants=False)
    return x.to(device), xt.to(device)


def _dense_rows(x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Rows [start, stop) of the sparse CSR ``x`` as a dense float32 block."""
    crow, col, val = x.crow_indices(), x.col_indices(), x.values()
    lo, hi = int(crow[start]), int(crow[stop])
    block = torch.zeros(stop - start, x.shape[1], dtype=torch.float32, device=x.device)
    lengths = crow[start + 1 : stop + 1] - crow[start:stop]
    local = torch.repeat_interleave(torch.arange(stop - start, device=x.device), lengths)
    block[local, col[lo:hi]] = val[lo:hi]
    return block


def _gram(x: torch.Tensor, xt: torch.Tensor, device: torch.device) -> torch.Tensor:
    """G = XᵀX (n_items × n_items, float32), never from the whole users × items dense X: as
    dense GEMMs over blocks of users when X is denser than :data:`DENSE_GRAM_DENSITY`, else as
    Xᵀ's sparse rows times dense blocks of X's columns (nnz × n_items multiply-adds)."""
    n, m = x.shape
    gram = torch.zeros(m, m, dtype=torch.float32, device=device)
    if x.values().numel() > DENSE_GRAM_DENSITY * n * m:
        for start in range(0, n, DENSE_BLOCK):
            block = _dense_rows(x, start, min(n, start + DENSE_BLOCK))
            gram.addmm_(block.T, block)
        return gram
    for start in range(0, m, DENSE_BLOCK):
        stop = min(m, start + DENSE_BLOCK)
        gram[:, start:stop] = xt @ _dense_rows(xt, start, stop).T
    return gram


def _kernel(x: torch.Tensor, xt: torch.Tensor, inv_lam: torch.Tensor, device: torch.device) -> torch.Tensor:
    """K = X diag(``inv_lam``) Xᵀ (n_users × n_users, float32; ``xt`` is Xᵀ). On a CPU, where
    the items' co-occurrences are few (Σ_j users_j² below :data:`SPARSE_KERNEL_SHARE` of the
    nnz × n_users a dense product costs), as one sparse × sparse product (Last.fm's 1,892
    users: 0.09 against 0.39 s); otherwise by dense blocks of users."""
    n = x.shape[0]
    degrees = (xt.crow_indices()[1:] - xt.crow_indices()[:-1]).double()
    if device.type == "cpu" and float((degrees ** 2).sum()) < SPARSE_KERNEL_SHARE * x.values().numel() * n:
        with warnings.catch_warnings():  # "sparse CSR support is in beta", as in csr_pair
            warnings.simplefilter("ignore", UserWarning)
            scaled = torch.sparse_csr_tensor(xt.crow_indices(), xt.col_indices(),
                                             xt.values() * inv_lam.repeat_interleave(degrees.long()), xt.shape,
                                             check_invariants=False)
            return (x @ scaled).to_dense()
    kernel = torch.empty(n, n, dtype=torch.float32, device=device)
    for start in range(0, n, DENSE_BLOCK):
        stop = min(n, start + DENSE_BLOCK)
        kernel[:, start:stop] = x @ (_dense_rows(x, start, stop) * inv_lam[None, :]).T
    return kernel


def _orthonormal(block: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis of ``block``'s columns (m × q, float32): CholeskyQR2 (Fukaya et al.
    2014) with the q × q Grams in float64, a tenth of a Householder QR's time on a CPU and a
    GPU alike. A Gram that is not numerically positive definite (a block of rank below q) is
    inverted through its eigendecomposition instead, and the columns it does not span become 0."""
    out = block
    for _ in range(2):
        out = out @ _inverse_root(out.T @ out)
    return out


def _h_orthonormal(block: torch.Tensor, h_block: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(W, H W): an H-orthonormal basis of ``block``'s columns (Wᵀ H W = I; ``h_block`` is
    H ``block``, H symmetric PSD), by CholeskyQR2 in the H inner product as :func:`_orthonormal`."""
    for _ in range(2):
        transform = _inverse_root(block.T @ h_block)
        block, h_block = block @ transform, h_block @ transform
    return block, h_block


def _inverse_root(gram: torch.Tensor) -> torch.Tensor:
    """(q, q) float32 T with Tᵀ ``gram`` T = I (upper triangular: the inverse transposed
    Cholesky factor, the Gram's diagonal scaled to 1 first); on a Gram that is not numerically
    positive definite, its inverse square root with the unspanned directions set to 0."""
    gram = gram.double()
    gram = (gram + gram.T) / 2
    scale = gram.diagonal().clamp_min(1e-300).sqrt()
    normed = gram / scale[:, None] / scale[None, :]
    factor, info = torch.linalg.cholesky_ex(normed)
    if int(info) == 0:
        inverse = torch.linalg.solve_triangular(factor.T, torch.eye(len(normed), dtype=normed.dtype,
                                                                    device=normed.device), upper=True)
    else:
        values, vectors = torch.linalg.eigh(normed)
        floor = 1e-12 * float(values.max().clamp_min(1e-300))
        inverse = vectors @ torch.diag(values.clamp_min(floor).rsqrt() * (values > floor)) @ vectors.T
    return (inverse / scale[:, None]).float()


def dlae_factors(csr: CSR, rows: np.ndarray, n_items: int, *, dim: int, dropout: float, l2: float,
                 seed: int = 0, device: str = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """(P, R), each (n_items, dim) float32 numpy: one fit of the rank-``dim`` DLAE of the users
    at ``rows`` (a :class:`Solver` used once). ``dropout`` is p in [0, 1) and ``l2`` is λ > 0
    (Steck 2020's notation)."""
    factors = Solver(csr, rows, n_items, dim=dim, device=device, seed=seed).fit(dropout, l2)
    return factors.p.cpu().numpy(), factors.r.cpu().numpy()


def best_temperature(user_vectors: torch.Tensor, item_vectors: torch.Tensor, batch_items: torch.Tensor,
                     batch_rows: torch.Tensor, batch_values: torch.Tensor, reduce: Reduce | None = None) -> float:
    """The scale t of the item vectors that minimises the mean multinomial NLL of the users'
    items under softmax(t · z Rᵀ): rankings do not depend on it, but the reconstruction error
    (and so the anomaly scores) does; a linear model's raw scores make a near-uniform softmax.

    ``user_vectors`` (n, d), ``item_vectors`` (n_items, d); the users' items as (nnz,) item
    rows, user positions and weights. Searched on a grid of powers of 2; under torch.distributed
    ``reduce`` sums each rank's NLLs, so every rank picks the same t.
    """
    logits = user_vectors.double() @ item_vectors.double().T  # (n, n_items)
    nll: dict[int, float] = {}

    def at(k: int) -> float:  # the (summed) NLL at TEMPERATURES[k], each computed once
        if k not in nll:
            value = -(torch.log_softmax(TEMPERATURES[k] * logits, dim=1)[batch_rows, batch_items] * batch_values).sum()
            value = value.reshape(1).cpu()
            nll[k] = float((reduce(value) if reduce is not None else value)[0])
        return nll[k]

    # The NLL is convex in t (a sum of log-sum-exps less a linear term), so along the grid it
    # falls then rises: a binary search on its slope finds the best of the 16 in at most 8.
    lo, hi = 0, len(TEMPERATURES) - 1
    while lo < hi:
        mid = (lo + hi) // 2
        if at(mid) <= at(mid + 1) or not math.isfinite(at(mid + 1)):
            hi = mid
        else:
            lo = mid + 1
    return TEMPERATURES[lo] if math.isfinite(at(lo)) else 1.0


def flops_floor(method: str, n_users: int, n_items: int, nnz: int, dim: int) -> tuple[float, float]:
    """(dense, sparse) FLOPs one fit on ``method``'s path cannot do without, for
    ``benchmarks/floors.py``: one application of the operator to a dim-wide block and the
    factors' last product and, on the exact paths, the dense side's Cholesky and inverse (the
    Gram, shared by a solver's fits, is not counted). Sparse FLOPs are 2 per stored entry and
    column, as the sparse products run at their own rate."""
    if method == "items":
        return n_items ** 3 + 6.0 * n_items * n_items * dim, 0.0
    if method == "users":
        return n_users ** 3 + 4.0 * n_users * n_users * dim, 2.0 * nnz * n_users + 8.0 * nnz * dim
    return 4.0 * n_items * dim * dim, 4.0 * nnz * dim
