"""LoRA on the UNet's attention projections (peft), saved and loaded with diffusers' LoRA helpers."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from .base import Method, freeze

WEIGHTS = "pytorch_lora_weights.safetensors"
TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


class LoRA(Method):
    name = "lora"
    lr = 1e-3

    def prepare(self, pipe):
        from peft import LoraConfig
        freeze(pipe)
        pipe.unet.add_adapter(LoraConfig(r=self.rank, lora_alpha=self.rank, init_lora_weights="gaussian",
                                         target_modules=TARGETS))
        return [p for p in pipe.unet.parameters() if p.requires_grad]

    def save(self, pipe, folder: Path) -> list[str]:
        from diffusers import StableDiffusionPipeline
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict
        layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.unet))
        StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=layers, weight_name=WEIGHTS,
                                                  safe_serialization=True)
        return [WEIGHTS]

    def card(self) -> dict[str, Any]:
        return {"rank": self.rank, "target_modules": TARGETS}

    @staticmethod
    def apply(pipe, folder: Path, card: dict[str, Any]) -> None:
        pipe.load_lora_weights(str(folder), weight_name=WEIGHTS, adapter_name="diffusionmic")
