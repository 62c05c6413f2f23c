"""Predictor overhead: time of phi(x_T) (network + schedule decode) as a share of an INDIS sampling call at
NFE 5 on the shipped digits UNet (paper: 2.3-2.5 % of sampling time; our goal <= 1 %).

    python benchmarks/bench_predictor_overhead.py [--batch 1 16 64] [--repeats 20]

Timed side by side in one run (median of --repeats): phi alone, and the full call phi + indis.sample. The
predictor's weights do not change its cost, so an untrained phi of the default size is timed.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import indis
from indis.engine.core.predictor import Predictor, PredictorConfig, ScheduleConfig
from indis.engine.testbeds.digits import load_backbone


def median_s(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 16, 64])
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--nfe", type=int, default=5)
    a = p.parse_args()
    torch.set_num_threads(2)
    model = load_backbone("unet")
    sc = ScheduleConfig(a.nfe, 0.002, 80.0)
    print(f"digits UNet, ipndm, NFE {a.nfe}, CPU, {torch.get_num_threads()} threads; median of {a.repeats}")
    print(f"{'B':>4} {'pool':>5} {'phi ms':>8} {'phi+sample ms':>14} {'share':>7}")
    for pool in (None, 2):
        phi = Predictor(PredictorConfig(sc, "ipndm", (1, 8, 8), pool=pool)).eval()
        for b in a.batch:
            x_T = 80.0 * indis.noise_from_seeds(range(b), (1, 8, 8))
            with torch.no_grad():
                t_phi = median_s(lambda: phi(x_T), a.repeats)  # noqa: B023
                t_all = median_s(lambda: indis.sample(model, x_T, phi(x_T), "ipndm"), a.repeats)  # noqa: B023
            print(f"{b:>4} {str(pool):>5} {1e3 * t_phi:8.3f} {1e3 * t_all:14.3f} {100 * t_phi / t_all:6.2f}%")


if __name__ == "__main__":
    main()
