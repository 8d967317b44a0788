"""Benchmark of timm_remem.analysis.mi.estimate_mi at n=10,000, d=192 per side, against straightforward baselines.

Each row times one of our methods and a baseline in the same run and prints the ratio:

- gaussian: numpy ``np.cov`` + ``np.linalg.slogdet`` on the same data (same quantity).
- ksg: a textbook KSG on scipy's ``cKDTree`` (the usual implementation, as in NPEET), run on the same random
  subsample our ``max_samples="auto"`` picks (same work); ``--full`` also times our KSG on all n rows.
- binning: ``sklearn.metrics.mutual_info_score`` on cell codes from ``np.unique(..., axis=0)``.
- renyi: dense Gram matrices and ``np.linalg.eigvalsh`` (Giraldo et al. as written) on the same subsample.
- ``--sklearn``: also ``sklearn.feature_selection.mutual_info_regression`` (1-D KSG per column of ``a`` against
  one column of ``b``), the per-dimension tool people reach for; it answers a different, smaller question.

Usage: ``python benchmarks/bench_mi.py [--n 10000] [--d 192] [--threads 2] [--full] [--sklearn]``. Never asserts.
"""

from __future__ import annotations

import argparse
import math
import os
import time

import numpy as np
import torch

from timm_remem.analysis.mi import _common as mi_mod  # the "auto" sample budgets
from timm_remem.analysis.mi import estimate_mi


def timed(fn, repeat: int = 1):
    best, out = math.inf, None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def ksg_kdtree(x: np.ndarray, y: np.ndarray, k: int = 3) -> float:
    from scipy.spatial import cKDTree
    from scipy.special import digamma

    x = (x - x.mean(0)) / x.std(0)
    y = (y - y.mean(0)) / y.std(0)
    xy = np.hstack([x, y])
    eps = cKDTree(xy).query(xy, k + 1, p=np.inf)[0][:, k]
    r = np.nextafter(eps, 0)
    nx = cKDTree(x).query_ball_point(x, r, p=np.inf, return_length=True) - 1
    ny = cKDTree(y).query_ball_point(y, r, p=np.inf, return_length=True) - 1
    return float(digamma(k) + digamma(len(x)) - np.mean(digamma(nx + 1) + digamma(ny + 1)))


def gaussian_numpy(x: np.ndarray, y: np.ndarray) -> float:
    c = np.cov(np.hstack([x, y]).T)
    d = x.shape[1]
    ld = lambda m: np.linalg.slogdet(m)[1]
    return 0.5 * (ld(c[:d, :d]) + ld(c[d:, d:]) - ld(c))


def binning_sklearn(x: np.ndarray, y: np.ndarray, bins: int = 30) -> float:
    from sklearn.metrics import mutual_info_score

    def cells(v: np.ndarray) -> np.ndarray:
        lo, hi = v.min(0), v.max(0)
        idx = np.clip(np.floor((v - lo) / ((hi - lo) / bins)), 0, bins - 1).astype(np.int64)
        return np.unique(idx, axis=0, return_inverse=True)[1].ravel()

    return float(mutual_info_score(cells(x), cells(y)))


def renyi_dense(x: np.ndarray, y: np.ndarray, alpha: float = 2.0) -> float:
    def gram(v: np.ndarray) -> np.ndarray:
        v = (v - v.mean(0)) / v.std(0)
        sq = (v**2).sum(1)
        d2 = np.clip(sq[:, None] + sq[None, :] - 2 * v @ v.T, 0, None)
        s = min(len(v), 1000)
        sigma = np.median(np.sqrt(d2[:s, :s][np.triu_indices(s, 1)]))
        return np.exp(-d2 / (2 * sigma**2))

    def entropy(k: np.ndarray) -> float:
        lam = np.clip(np.linalg.eigvalsh(k / np.trace(k)), 0, None)
        return float(np.log(np.sum(lam**alpha)) / (1 - alpha))

    ka, kb = gram(x), gram(y)
    return entropy(ka) + entropy(kb) - entropy(ka * kb)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--d", type=int, default=192)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=2, help="best of this many runs (ours)")
    parser.add_argument("--full", action="store_true", help="also time our KSG on all n rows")
    parser.add_argument("--sklearn", action="store_true", help="also time sklearn mutual_info_regression")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    g = torch.Generator().manual_seed(0)
    n, d = args.n, args.d
    # Teacher-like features: b is a noisy linear read-out of a (d x d mixing), so the dependence is spread out.
    a = torch.randn(n, d, generator=g)
    w = torch.randn(d, d, generator=g) / math.sqrt(d)
    b = a @ w + 0.5 * torch.randn(n, d, generator=g)
    an, bn = a.numpy().astype(np.float64), b.numpy().astype(np.float64)

    m_ksg = min(n, int(math.sqrt(mi_mod._KSG_BUDGET / (2 * d + 8))))
    m_renyi = min(n, int(math.sqrt(mi_mod._RENYI_BUDGET / (2 * d + 16))))
    gen = torch.Generator().manual_seed(0)
    sub_k = torch.randperm(n, generator=gen)[:m_ksg].sort().values.numpy()
    sub_r = torch.randperm(n, generator=gen)[:m_renyi].sort().values.numpy()

    # b | a ~ N(a W, 0.25 I) with a ~ N(0, I): I(a; b) = 0.5 logdet(W^T W + 0.25 I) - 0.5 logdet(0.25 I).
    wd = w.double()
    truth = 0.5 * float(torch.logdet(wd.T @ wd + 0.25 * torch.eye(d, dtype=torch.float64))) - 0.5 * d * math.log(0.25)
    print(f"n={n} d_a=d_b={d} torch threads={args.threads} cpus={os.cpu_count()} "
          f"load={os.getloadavg()[0]:.1f} torch={torch.__version__}; true MI of the population: {truth:.4f} nats")
    rows = []

    t_ours, v_ours = timed(lambda: estimate_mi(a, b, method="gaussian"), args.repeat)
    t_base, v_base = timed(lambda: gaussian_numpy(an, bn))
    rows.append(("gaussian", n, t_ours, v_ours, "numpy cov+slogdet", n, t_base, v_base))

    t_ours, v_ours = timed(lambda: estimate_mi(a, b, method="ksg"), args.repeat)
    t_base, v_base = timed(lambda: ksg_kdtree(an[sub_k], bn[sub_k]))
    rows.append(("ksg (auto subsample)", m_ksg, t_ours, v_ours, "scipy cKDTree KSG", m_ksg, t_base, v_base))

    t_ours, v_ours = timed(lambda: estimate_mi(a, b, method="binning"), args.repeat)
    t_base, v_base = timed(lambda: binning_sklearn(an, bn))
    rows.append(("binning (30 bins)", n, t_ours, v_ours, "np.unique + sklearn MI", n, t_base, v_base))

    t_ours, v_ours = timed(lambda: estimate_mi(a, b, method="renyi"), args.repeat)
    t_base, v_base = timed(lambda: renyi_dense(an[sub_r], bn[sub_r]))
    rows.append(("renyi a=2 (auto subsample)", m_renyi, t_ours, v_ours, "dense Gram + eigvalsh", m_renyi, t_base,
                 v_base))

    t_ours, v_ours = timed(lambda: estimate_mi(a, b, method="renyi", alpha=1.01), args.repeat)
    sub_e = sub_r[: mi_mod._RENYI_EIG_SAMPLES] if len(sub_r) > mi_mod._RENYI_EIG_SAMPLES else sub_r
    t_base, v_base = timed(lambda: renyi_dense(an[sub_e], bn[sub_e], alpha=1.01))
    rows.append(("renyi a=1.01 (auto subsample)", min(n, mi_mod._RENYI_EIG_SAMPLES), t_ours, v_ours,
                 "dense Gram + eigvalsh", len(sub_e), t_base, v_base))

    if args.full:
        t_ours, v_ours = timed(lambda: estimate_mi(a, b, method="ksg", max_samples=None))
        rows.append(("ksg (all rows)", n, t_ours, v_ours, "-", 0, math.nan, math.nan))
    if args.sklearn:
        from sklearn.feature_selection import mutual_info_regression

        t_base, v_base = timed(lambda: float(mutual_info_regression(an, bn[:, 0], random_state=0).sum()))
        rows.append(("(sklearn per-column, b[:,0])", n, math.nan, math.nan, "mutual_info_regression", n, t_base,
                     v_base))

    head = f"{'method':32s} {'m':>6s} {'ours s':>8s} {'ours MI':>9s} | {'baseline':24s} {'m':>6s} " \
           f"{'base s':>8s} {'base MI':>9s} {'speed-up':>8s}"
    print(head)
    print("-" * len(head))
    for name, m1, t1, v1, bname, m2, t2, v2 in rows:
        ratio = t2 / t1 if t1 == t1 and t2 == t2 else math.nan
        print(f"{name:32s} {m1:6d} {t1:8.3f} {v1:9.4f} | {bname:24s} {m2:6d} {t2:8.3f} {v2:9.4f} {ratio:8.2f}")


if __name__ == "__main__":
    main()
