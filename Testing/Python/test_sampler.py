"""Sampler wiring against the closed-form optimal denoiser for Gaussian data."""
import pytest
import torch

from DiffusionMICLib.engine.sampler import sample
from DiffusionMICLib.engine.schedule import NoiseSchedule

MU, STD = 0.3, 0.5


def gaussian_optimal(schedule: NoiseSchedule):
    """E[eps | x_t] (or E[v | x_t]) for x_0 ~ N(MU, STD^2): the ideal network."""
    alphas = schedule.training_scheduler().alphas_cumprod

    def model(x, t):
        a = alphas[int(t)].to(x.dtype)
        var = a * STD**2 + (1 - a)
        eps = (1 - a).sqrt() * (x - a.sqrt() * MU) / var
        if schedule.prediction_type == "epsilon":
            return eps
        x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
        if schedule.prediction_type == "sample":
            return x0
        return a.sqrt() * eps - (1 - a).sqrt() * x0
    return model


def moments(schedule, sampler, steps, n=20000, **kw):
    g = torch.Generator().manual_seed(0)
    x = sample(gaussian_optimal(schedule), (n, 1), schedule, sampler=sampler, steps=steps, generator=g, **kw)
    return x.mean().item(), x.std().item()


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("beta", ["linear", "cosine"])
def test_few_step_samplers_match_ddpm_1000(prediction, beta):
    schedule = NoiseSchedule(beta_schedule=beta, prediction_type=prediction)
    ref_mean, ref_std = moments(schedule, "ddpm", 1000)
    assert abs(ref_mean - MU) < 0.02 and abs(ref_std - STD) < 0.02
    for sampler, steps in [("dpm++2m", 20), ("ddim", 50), ("unipc", 20)]:
        mean, std = moments(schedule, sampler, steps)
        assert abs(mean - ref_mean) < 0.02, (sampler, mean, ref_mean)
        assert abs(std - ref_std) < 0.03, (sampler, std, ref_std)


def test_partial_diffusion_keeps_start_at_low_strength():
    schedule = NoiseSchedule()
    start = torch.full((2000, 1), 0.8)
    g = torch.Generator().manual_seed(1)
    low = sample(gaussian_optimal(schedule), start.shape, schedule, steps=10, start=start, strength=0.1, generator=g)
    high = sample(gaussian_optimal(schedule), start.shape, schedule, steps=10, start=start, strength=1.0, generator=g)
    # little noise added: the result stays near the start; full strength forgets it
    assert (low - start).abs().mean() < (high - start).abs().mean() / 2
    assert abs(high.mean().item() - MU) < 0.05


def test_same_seed_same_sample():
    schedule = NoiseSchedule()
    a = sample(gaussian_optimal(schedule), (10, 1), schedule, steps=5, generator=torch.Generator().manual_seed(3))
    b = sample(gaussian_optimal(schedule), (10, 1), schedule, steps=5, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
