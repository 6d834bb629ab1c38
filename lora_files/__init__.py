"""The LoRA files a run writes: diffusers' and kohya's formats (for diffusers, ComfyUI, A1111/Forge and kohya),
with the model card beside them."""
