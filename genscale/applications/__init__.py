"""Diffusion applications on a trained ddpm (or ldm) run, reached through ``sample.py --task``.

One file per job: ``views`` and ``filters`` (the pixel maps the tricks combine), ``model`` (a
run's network as an eps function, the guided prediction and the shared reverse loop),
``denoise``, ``sdedit`` (img2img), ``repaint`` (inpainting), ``anagram``, ``hybrid``,
``denoiser_sweep`` (the single-step denoiser family's sigma sweep), ``inputs`` (images in and
grids out) and ``tasks`` (the command-line side). See docs/applications.md.
"""
