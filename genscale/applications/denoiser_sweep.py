"""The denoiser family's test-time sweep: noise held-out images at sigma = 0 ... 1 (the run was
trained at one sigma, 0.5 by default), denoise each in one pass, and report PSNR against sigma.

Writes ``OUT.png`` (one row per sigma: the noisy images, then their denoised versions),
``OUT-psnr.png`` (PSNR of the noisy input and of the output against sigma) and ``OUT.npz``
(arr_0: the denoised images, sigma-major; sigmas, psnr_noisy, psnr_denoised).
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from genscale.applications.denoise import pooled_psnr
from genscale.applications.inputs import write_task_outputs
from genscale.cli import output_files
from genscale.run_files import grid_image, to_uint8

SHOWN = 6  # images per row of the grid


def plot_psnr(path: Path, sigmas: list[float], noisy: list[float], denoised: list[float], train_sigma: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    finite = lambda v: [x if math.isfinite(x) else np.nan for x in v]  # sigma 0: the noisy input is exact
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(sigmas, finite(noisy), "o--", label="noisy input")
    ax.plot(sigmas, finite(denoised), "o-", label="denoised (one pass)")
    ax.axvline(train_sigma, color="grey", lw=0.8, ls=":", label=f"training sigma {train_sigma:g}")
    ax.set_xlabel("test noise sigma (images in [-1, 1])")
    ax.set_ylabel("PSNR (dB)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


@torch.no_grad()
def sigma_sweep(family, images: torch.Tensor, sigmas: list[float], out: str,
                generator: torch.Generator | None = None) -> list[Path]:
    """Run the sweep on ``images`` (N x C x H x W in [-1, 1]) and write the three files."""
    output_files(out)  # checked before the sweep, not after it
    path = Path(out)
    rows, outputs, psnr_noisy, psnr_out = [], [], [], []
    for sigma in sigmas:
        noisy, den = family.noisy_pair(images, sigma, generator)
        psnr_noisy.append(pooled_psnr(noisy.clamp(-1, 1), images))
        psnr_out.append(pooled_psnr(den, images))
        outputs.append(den)
        rows.append(np.concatenate([to_uint8(noisy[:SHOWN]), to_uint8(den[:SHOWN])]))
        print(f"sigma {sigma:.2f}: PSNR noisy {psnr_noisy[-1]:.2f} dB, denoised {psnr_out[-1]:.2f} dB")
    k = min(SHOWN, len(images))
    grid = grid_image(np.concatenate(rows), 2 * k, scale=max(1, min(8, 64 // images.shape[-1])))
    written = write_task_outputs(out, grid, torch.cat(outputs),
                                 dict(sigmas=np.array(sigmas), psnr_noisy=np.array(psnr_noisy),
                                      psnr_denoised=np.array(psnr_out)))
    plot = path.with_name(path.stem + "-psnr.png")
    plot_psnr(plot, sigmas, psnr_noisy, psnr_out, float(family.opts.sigma))
    return written + [plot]
