"""`diffusion-mic benchmark`: UNet forward time, N-step sampling time per sampler, their ratio.

The ratio (sampling time / N forwards) is the sampler's overhead; the goal is <= 1.1.
Timings are medians of several repeats in one process, so compare the ratios, not the seconds.
"""
from __future__ import annotations

import resource
import statistics
import time

import torch

from .engine.network import build_network, count_parameters, network_config
from .engine.sampler import conditioned, sample
from .engine.schedule import SAMPLERS, NoiseSchedule


def _median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(size: int = 96, steps: int = 10, batch: int = 8, repeats: int = 3) -> None:
    torch.manual_seed(0)
    network = build_network(network_config(2, 1)).eval()
    with torch.no_grad():   # MONAI zero-initialises the output conv: give it non-zero output
        for p in network.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    schedule = NoiseSchedule(prediction_type="v_prediction")
    cond = torch.randn(batch, 1, size, size)
    x = torch.randn(batch, 1, size, size)
    model = conditioned(network, cond)
    with torch.inference_mode():
        model(x, torch.tensor(500))   # warm-up
        forward = _median_time(lambda: model(x, torch.tensor(500)), repeats * 2)
        rows = []
        for name in SAMPLERS:
            n = steps
            t = _median_time(lambda: sample(model, x.shape, schedule, sampler=name, steps=n,
                                            generator=torch.Generator().manual_seed(0)), repeats)
            rows.append((name, n, t, t / (n * forward)))
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"network: MONAI DiffusionModelUNet {network_config(2, 1)['channels']}, "
          f"{count_parameters(network) / 1e6:.2f} M parameters; input {batch}x2x{size}x{size}; "
          f"torch threads {torch.get_num_threads()}")
    print(f"one forward: {forward * 1000:.1f} ms")
    print(f"{'sampler':<10}{'steps':>6}{'time s':>10}{'per step ms':>13}{'overhead':>10}")
    for name, n, t, ratio in rows:
        print(f"{name:<10}{n:>6}{t:>10.3f}{t / n * 1000:>13.1f}{ratio:>9.2f}x")
    print(f"peak resident memory: {peak_mb:.0f} MB"
          + (f"; CUDA peak {torch.cuda.max_memory_allocated() / 2**20:.0f} MB" if torch.cuda.is_available() else ""))
