"""The denoiser family's test-time sweep: noise held-out images at sigma = 0 ... 1 (the run was
trained at one sigma, 0.5 by default), denoise each in one pass, and report PSNR against sigma.

Writes ``OUT.png`` (one row per sigma: the noisy images, then their denoised versions),
``OUT-psnr.png`` (PSNR of the noisy input and of the output against sigma) and ``OUT.npz``
(arr_0: the denoised images, sigma-major; sigmas, psnr_noisy, psnr_denoised); ``--out OUT.npz``
writes the .npz alone, ``--out OUT.png`` the two pictures.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from genscale.applications.denoise import psnr_from_sse, squared_error
from genscale.applications.inputs import write_task_outputs
from genscale.cli import output_files
from genscale.errors import UserError
from genscale.metrics.sharded import chunk_generator
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


def sweep_batch(family, images: torch.Tensor, sigmas: list[float], generator: torch.Generator | None):
    """One batch through every sigma: per sigma the noisy and denoised images (uint8 NHWC) and their
    squared errors against ``images``; a non-finite output (an absurd sigma) is refused."""
    noisy_u8, den_u8, sse_noisy, sse_den = [], [], [], []
    for sigma in sigmas:
        noisy, den = family.noisy_pair(images, sigma, generator)
        if not bool(torch.isfinite(den).all()):
            raise UserError(f"the denoiser's output at --sigmas value {sigma:g} is NaN or infinite; "
                            "choose smaller noise levels (nothing was written)")
        sse_noisy.append(squared_error(noisy.clamp(-1, 1), images))
        sse_den.append(squared_error(den, images))
        noisy_u8.append(to_uint8(noisy))
        den_u8.append(to_uint8(den))
    return noisy_u8, den_u8, sse_noisy, sse_den


@torch.no_grad()
def sigma_sweep(family, images: torch.Tensor, sigmas: list[float], out: str,
                generator: torch.Generator | None = None, *, batch_size: int | None = None, seed: int = 0,
                progress: bool = False) -> list[Path]:
    """Run the sweep on ``images`` (N x C x H x W in [-1, 1]) and write the files ``out`` asks for.

    ``batch_size`` None: one batch drawing from ``generator``; otherwise batches of ``batch_size``,
    batch k drawing from the generator seeded by (``seed``, k), with a bar over the images.
    """
    files = output_files(out)  # checked before the sweep, not after it
    n = len(images)
    size = n if batch_size is None else batch_size
    noisy, den = [[] for _ in sigmas], [[] for _ in sigmas]
    sse_noisy, sse_den = np.zeros(len(sigmas)), np.zeros(len(sigmas))
    bar = tqdm(total=n, desc="denoiser sweep", disable=not progress or n <= size, leave=False, dynamic_ncols=True)
    for k, start in enumerate(range(0, n, size)):
        gen = generator if batch_size is None else chunk_generator(seed, k)
        batch = images[start:start + size].to(family.device)
        parts = sweep_batch(family, batch, sigmas, gen)
        for i in range(len(sigmas)):
            have = sum(len(a) for a in noisy[i])  # the grid shows the first SHOWN noisy images only
            if have < SHOWN:
                noisy[i].append(parts[0][i][:SHOWN - have])
            den[i].append(parts[1][i])
        sse_noisy += parts[2]
        sse_den += parts[3]
        bar.update(len(batch))
    bar.close()
    count = images.numel()
    psnr_noisy = [psnr_from_sse(v, count) for v in sse_noisy]
    psnr_out = [psnr_from_sse(v, count) for v in sse_den]
    for sigma, pn, po in zip(sigmas, psnr_noisy, psnr_out):
        print(f"sigma {sigma:.2f}: PSNR noisy {pn:.2f} dB, denoised {po:.2f} dB")
    noisy, den = [np.concatenate(v) for v in noisy], [np.concatenate(v) for v in den]
    k = min(SHOWN, n)
    rows = np.concatenate([np.concatenate([a[:SHOWN], b[:SHOWN]]) for a, b in zip(noisy, den)])
    grid = grid_image(rows, 2 * k, scale=max(1, min(8, 64 // images.shape[-1])))
    written = write_task_outputs(out, grid, np.concatenate(den),
                                 dict(sigmas=np.array(sigmas), psnr_noisy=np.array(psnr_noisy),
                                      psnr_denoised=np.array(psnr_out)))
    if ".png" in files:  # the plot is a picture: --out OUT.npz asks for the arrays only
        plot = Path(out).with_name(Path(out).stem + "-psnr.png")
        plot_psnr(plot, sigmas, psnr_noisy, psnr_out, float(family.opts.sigma))
        written.append(plot)
    return written
