"""The diffusion engine shared by all five tasks: networks, noise schedules, samplers, trainer."""
