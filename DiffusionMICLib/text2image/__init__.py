"""Text-to-image on the Stable Diffusion architecture (issue 13): a small base trained here or any SD
1.x/2.x checkpoint on disk, fine-tuned by LoRA, DreamBooth, HyperNetwork or Embedding."""
