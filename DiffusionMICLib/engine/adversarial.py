"""A patch critic for adversarial losses: MONAI's PatchDiscriminator with least-squares
PatchAdversarialLoss and its own Adam optimiser (lr 2e-4, betas (0.5, 0.999), as pix2pix,
CycleGAN and MONAI's autoencoder tutorials). Used by the latent autoencoder's training and by
the study's GAN baselines."""
from __future__ import annotations

from typing import Any

import torch
from monai.losses import PatchAdversarialLoss
from monai.networks.nets import PatchDiscriminator

D_LR, D_BETAS = 2e-4, (0.5, 0.999)


class Critic:
    """One PatchDiscriminator (spec: its keyword arguments, spatial_dims 2 unless given) with its
    optimiser and the least-squares patch loss."""

    def __init__(self, spec: dict[str, Any], device: torch.device):
        self.net = PatchDiscriminator(**{"spatial_dims": 2, **spec}).to(device).train()
        self.optimizer = torch.optim.Adam(self.net.parameters(), lr=D_LR, betas=D_BETAS)
        self.criterion = PatchAdversarialLoss(criterion="least_squares")

    def step(self, real: torch.Tensor, fake: torch.Tensor) -> float:
        """One discriminator update: real patches towards 1, generated ones towards 0."""
        self.net.requires_grad_(True)
        self.optimizer.zero_grad(set_to_none=True)
        loss = 0.5 * (self.criterion(self.net(real)[-1], target_is_real=True, for_discriminator=True)
                      + self.criterion(self.net(fake.detach())[-1], target_is_real=False, for_discriminator=True))
        loss.backward()
        self.optimizer.step()
        self.net.requires_grad_(False)      # the generator's loss below trains only the generator
        return float(loss.detach())

    def fooled(self, fake: torch.Tensor) -> torch.Tensor:
        """The generator's adversarial loss: generated patches judged real."""
        return self.criterion(self.net(fake)[-1], target_is_real=True, for_discriminator=False)

    def state_dict(self) -> dict[str, Any]:
        return {"net": self.net.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.net.load_state_dict(state["net"])
        self.optimizer.load_state_dict(state["optimizer"])
