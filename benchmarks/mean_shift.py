"""llmjax.cluster.mean_shift against sklearn.cluster.MeanShift on the same points.

  python benchmarks/mean_shift.py                       # 5k, 20k, 100k points; 2-D and 8-D
  python benchmarks/mean_shift.py --sizes=5000 --dims=2 --seeding=all,bin --json=out.json

Points: sklearn's make_blobs (5 blobs, std 1, seed 0); one bandwidth for both systems,
sklearn.cluster.estimate_bandwidth(quantile=0.2) on 1,000 of the points. Each case runs sklearn
once (its n_jobs as --sklearn_jobs) and llmjax twice: the first call compiles, the second is
the figure (the JIT cache makes every later call of the same shapes cost that). The ratio is
sklearn's seconds over llmjax's warm seconds; "same" says whether both gave the same number of
centers, within 1e-3 of each other after sorting, and the same partition of the points.
`--seeding=all` (every point a seed) is skipped above --all_seeds_max points (default 5,000):
sklearn took 108 s for 5,000 points in 2-D here, and its time grows with N^2. Nothing of
llmjax.data is imported.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import bench_common as common
from llmjax import cluster


def _canonical(centers_KD, labels_N):
  order = np.lexsort(centers_KD.T[::-1])
  rank = np.empty(len(order), int)
  rank[order] = np.arange(len(order))
  return centers_KD[order], rank[labels_N]


def _same(ours, theirs) -> bool:
  (ours_KD, ours_N), (theirs_KD, theirs_N) = _canonical(*ours), _canonical(*theirs)
  return (ours_KD.shape == theirs_KD.shape and np.allclose(ours_KD, theirs_KD, atol=1e-3)
          and bool(np.all(ours_N == theirs_N)))


def run_case(n: int, d: int, seeding: str, sklearn_jobs: int | None) -> dict:
  from sklearn import cluster as sk_cluster
  from sklearn.datasets import make_blobs
  x_ND, _ = make_blobs(n_samples=n, centers=5, n_features=d, cluster_std=1.0, random_state=0)
  bandwidth = float(sk_cluster.estimate_bandwidth(x_ND, quantile=0.2, n_samples=min(n, 1000),
                                                  random_state=0))
  options = dict(bandwidth=bandwidth, bin_seeding=seeding == "bin")
  start = time.perf_counter()
  theirs = sk_cluster.MeanShift(**options, n_jobs=sklearn_jobs).fit(x_ND)
  sklearn_s = time.perf_counter() - start
  times = []
  for _ in range(2):
    start = time.perf_counter()
    ours = cluster.mean_shift(x_ND, **options)
    times.append(time.perf_counter() - start)
  return {"points": n, "dims": d, "seeding": seeding, "bandwidth": bandwidth,
          "centers": len(ours[0]), "sklearn_centers": len(theirs.cluster_centers_),
          "sklearn_s": sklearn_s, "llmjax_first_s": times[0], "llmjax_s": times[1],
          "ratio": sklearn_s / times[1],
          "same": _same(ours, (theirs.cluster_centers_, theirs.labels_))}


def main(argv: list[str] | None = None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--sizes", default="5000,20000,100000")
  parser.add_argument("--dims", default="2,8")
  parser.add_argument("--seeding", default="bin,all", help="bin (bin_seeding) and/or all")
  parser.add_argument("--all_seeds_max", type=int, default=5000)
  parser.add_argument("--sklearn_jobs", type=int, default=None, help="MeanShift's n_jobs")
  parser.add_argument("--tiny", action="store_true", help="one small case (for the tests)")
  parser.add_argument("--json", default="")
  args = parser.parse_args(argv)
  if args.tiny:
    args.sizes, args.dims, args.seeding = "300", "2", "bin,all"
  rows = []
  for n in map(int, args.sizes.split(",")):
    for d in map(int, args.dims.split(",")):
      for seeding in args.seeding.split(","):
        if seeding == "all" and n > args.all_seeds_max:
          continue
        rows.append(run_case(n, d, seeding, args.sklearn_jobs))
        r = rows[-1]
        print(f"{n:>7} points {d}-D {seeding:>3} seeds: sklearn {r['sklearn_s']:.3f} s, llmjax "
              f"{r['llmjax_s']:.3f} s (first {r['llmjax_first_s']:.3f}), x{r['ratio']:.3g}, "
              f"{r['centers']} centers, same: {r['same']}", flush=True)
  env = common.environment()
  print(common.host_line(env))
  print(common.format_table(
      ["points", "D", "seeds", "bandwidth", "K", "sklearn s", "llmjax s", "first s", "ratio",
       "same"], [[r["points"], r["dims"], r["seeding"], r["bandwidth"], r["centers"],
                  r["sklearn_s"], r["llmjax_s"], r["llmjax_first_s"], r["ratio"], r["same"]]
                 for r in rows]))
  result = {"benchmark": "mean_shift", "rows": rows, "environment": env,
            "sklearn_jobs": args.sklearn_jobs}
  common.write_json(args.json, result)
  return result


if __name__ == "__main__":
  main()
