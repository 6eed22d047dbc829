"""Adversarial training for the study's GAN baselines (pix2pix, CycleGAN, the 3D generator):
MONAI PatchDiscriminators and PatchAdversarialLoss (least squares) inside the engine's trainer
(AdamW, EMA, clipping and learning-rate schedule for the generator). Each generator step first
takes one discriminator step (engine.adversarial.Critic)."""
from __future__ import annotations

from typing import Any

import torch

from ..engine.adversarial import Critic
from ..engine.trainer import Batch
from .learners import SupervisedTrainer


class AdversarialTrainer(SupervisedTrainer):
    """pix2pix (conditional: the discriminator sees [cond, image], loss = adversarial +
    `supervised_weight` * supervised loss, e.g. L1) or an unconditional GAN (latent_size > 0:
    the generator maps N(0, I) latents to images; no supervised loss)."""

    def __init__(self, *args: Any, discriminator: dict[str, Any], supervised_weight: float = 100.0,
                 latent_size: int = 0, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.critic = Critic(discriminator, self.device)
        self.supervised_weight, self.latent_size = supervised_weight, latent_size

    def loss(self, batch: Batch) -> torch.Tensor:
        real = batch.target.to(self.device)
        if self.latent_size:
            z = torch.randn((real.shape[0], self.latent_size), generator=self.generator).to(self.device)
            fake = self.model(z)
            self.critic.step(real, fake)
            return self.critic.fooled(fake)
        cond = batch.cond.to(self.device)
        fake = self.model(cond)
        self.critic.step(torch.cat([cond, real], 1), torch.cat([cond, fake], 1))
        return self.critic.fooled(torch.cat([cond, fake], 1)) + self.supervised_weight * self.supervised_loss(fake, batch)


class CycleTrainer(SupervisedTrainer):
    """CycleGAN on unpaired batches (cond from some subjects = domain A, target from others =
    domain B): two generators (a CyclePair), two discriminators, least-squares adversarial
    losses plus `cycle_weight` * the L1 cycle-consistency losses A -> B -> A and B -> A -> B."""

    def __init__(self, *args: Any, discriminators: tuple[dict[str, Any], dict[str, Any]], cycle_weight: float = 10.0,
                 **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.critic_a, self.critic_b = (Critic(spec, self.device) for spec in discriminators)
        self.cycle_weight = cycle_weight

    def loss(self, batch: Batch) -> torch.Tensor:
        a, b = batch.cond.to(self.device), batch.target.to(self.device)
        pair = self.network
        fake_b, fake_a = pair.ab(a), pair.ba(b)
        self.critic_b.step(b, fake_b)
        self.critic_a.step(a, fake_a)
        l1 = torch.nn.functional.l1_loss
        cycle = l1(pair.ba(fake_b), a) + l1(pair.ab(fake_a), b)
        return self.critic_b.fooled(fake_b) + self.critic_a.fooled(fake_a) + self.cycle_weight * cycle


class VAETrainer(SupervisedTrainer):
    """A variational autoencoder (MONAI VarAutoEncoder) on the targets: the squared error summed
    over the voxels + `beta` * the KL divergence to N(0, I) (as MONAI's VAE tutorial), per voxel."""

    def __init__(self, *args: Any, beta: float = 1.0, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.beta = beta

    def loss(self, batch: Batch) -> torch.Tensor:
        x = batch.target.to(self.device)
        recon, mu, logvar, _ = self.model(x)
        kl = -0.5 * torch.sum(1 + logvar - mu**2 - logvar.exp(), dim=1).mean()
        return torch.nn.functional.mse_loss(recon, x) + self.beta * kl / x[0].numel()
