"""Simplex noise (engine.simplex): seeded, normalised, low-frequency, and the trainer's noise hook."""
import numpy as np
import pytest
import torch

from DiffusionMICLib.engine.network import build_network, network_config
from DiffusionMICLib.engine.schedule import NoiseSchedule
from DiffusionMICLib.engine.simplex import noise_from_spec, simplex2, simplex3, simplex_noise
from DiffusionMICLib.engine.trainer import Batch, TrainConfig, Trainer
from DiffusionMICLib.errors import DiffusionMICError


def noise(shape, seed=0, **kw):
    return simplex_noise(shape, torch.Generator().manual_seed(seed), **kw)


def spectral_centroid(x: torch.Tensor) -> float:
    """Power-weighted mean radial frequency (cycles/voxel) of 2D fields (B, C, y, x)."""
    a = x.reshape(-1, *x.shape[-2:]).double().numpy()
    power = np.abs(np.fft.fft2(a - a.mean(axis=(1, 2), keepdims=True))) ** 2
    fy = np.fft.fftfreq(a.shape[1])[:, None]
    fx = np.fft.fftfreq(a.shape[2])[None, :]
    radius = np.sqrt(fy**2 + fx**2)
    return float((power * radius).sum() / power.sum())


def test_same_seed_same_noise_and_seeds_differ():
    for shape in [(2, 3, 24, 20), (1, 2, 10, 12, 14)]:
        a, b, c = noise(shape, 1), noise(shape, 1), noise(shape, 2)
        assert a.shape == shape and a.dtype == torch.float32
        assert torch.equal(a, b)
        assert not torch.allclose(a, c)
    fields = noise((2, 2, 32, 32), 0).reshape(4, -1)
    for i in range(4):          # every (item, channel) its own field
        for j in range(i + 1, 4):
            assert abs(np.corrcoef(fields[i], fields[j])[0, 1]) < 0.5


@pytest.mark.parametrize("shape", [(4, 1, 64, 64), (2, 1, 24, 28, 20)])
def test_normalised_zero_mean_unit_std(shape):
    x = noise(shape, 3)
    per_field = x.reshape(shape[0] * shape[1], -1)
    assert per_field.mean(dim=1).abs().max() < 1e-4
    assert (per_field.std(dim=1) - 1).abs().max() < 1e-3
    raw = noise((16, 1, 64, 64), 4, normalise=False)
    assert abs(raw.mean().item()) < 0.1 * raw.std().item()     # about zero mean before normalising too
    assert torch.isfinite(raw).all() and raw.abs().max() < 3.0


def test_raw_simplex_in_range_and_continuous():
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(256, generator=g)
    xy = torch.rand(2, 20000, generator=g) * 40
    for values in (simplex2(xy[0], xy[1], perm), simplex3(xy[0], xy[1], xy[0] * 0.5 + 3.0, perm)):
        assert values.abs().max() <= 1.05 and values.std() > 0.2
    # a small step in space changes the value a little (a smooth field, unlike white noise)
    step = simplex2(xy[0] + 0.01, xy[1], perm) - simplex2(xy[0], xy[1], perm)
    assert step.abs().max() < 0.1


def test_spectrum_follows_frequency_and_octaves():
    shape = (8, 1, 64, 64)
    white = spectral_centroid(torch.randn(shape, generator=torch.Generator().manual_seed(0)))
    coarse = spectral_centroid(noise(shape, frequency=1 / 32, octaves=1))
    fine = spectral_centroid(noise(shape, frequency=1 / 8, octaves=1))
    more = spectral_centroid(noise(shape, frequency=1 / 32, octaves=4))
    # lower base frequency -> power at lower frequencies; octaves add finer detail on top
    assert coarse < 0.6 * fine
    assert coarse < more < white
    assert spectral_centroid(noise(shape)) < 0.6 * white


def test_noise_spec_and_errors():
    assert noise_from_spec(None) is None and noise_from_spec({"type": "gaussian"}) is None
    fn = noise_from_spec({"type": "simplex", "octaves": 2})
    x = fn((2, 1, 16, 16), torch.Generator().manual_seed(0))
    assert x.shape == (2, 1, 16, 16)
    with pytest.raises(DiffusionMICError, match="unknown noise type"):
        noise_from_spec({"type": "pink"})
    with pytest.raises(DiffusionMICError, match="unknown simplex"):
        noise_from_spec({"type": "simplex", "scale": 3})
    with pytest.raises(DiffusionMICError):
        noise((2, 16, 16))


def test_trainer_draws_noise_from_the_hook():
    calls = []

    def fn(shape, generator):
        calls.append(shape)
        return simplex_noise(shape, generator)

    net = build_network(network_config(1, 1, channels=[16, 16], attention_levels=[False, False], norm_num_groups=16,
                                        num_head_channels=16))
    trainer = Trainer(net, NoiseSchedule(), TrainConfig(max_steps=2, batch_size=2, amp=False), torch.device("cpu"),
                      noise_fn=fn)
    batch = Batch(torch.zeros(2, 1, 16, 16))
    trainer.fit(iter([batch, batch]))
    assert calls == [(2, 1, 16, 16)] * 2
