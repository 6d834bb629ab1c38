"""Stable Diffusion 1.x base models: loaded from the Hub (cache first), a diffusers folder or a single checkpoint
file, with SD1.5's configs shipped for offline use; ``likeness prefetch``; the tiny random model of the demo."""
