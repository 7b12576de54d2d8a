"""Blur vs one-step vs iterative denoising at t = T/2 with the *exact* denoiser of a known prior.

docs/applications.md reports that on the trained digits ddpm run the one-step estimate beats
iterative denoising in PSNR. This script checks whether that is the model's fault or the maths:
it replaces the network by the exact posterior mean of a prior we can write down, the empirical
distribution of the digits training split (a uniform mixture of point masses y_1..y_M):

    E[x0 | x_t] = sum_i w_i y_i,   w_i ∝ exp(-|x_t - sqrt(abar_t) y_i|^2 / (2 (1 - abar_t)))

(computed in float64), and runs the same three methods as ``--task denoise`` (same cosine
schedule, T = 1000, same strided DDIM/ancestral steps, same blur) on

  (A) clean images drawn from that prior (the training digits): here the one-step answer is the
      minimum-MSE estimate by definition, and an exact posterior sample (ancestral sampling with
      the exact denoiser and many steps) has exactly twice its MSE, i.e. 10 log10 2 = 3.01 dB less;
  (B) held-out test digits (the setting of the measurement in the docs).

    OMP_NUM_THREADS=1 python scripts/denoise_ideal_posterior.py [NUM_IMAGES]

Prints a table of PSNR (dB, pooled over all pixels, range [-1, 1], as in --task denoise).
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from genscale.applications.denoise import pooled_psnr  # noqa: E402
from genscale.applications.filters import lowpass  # noqa: E402
from genscale.diffusion.samplers import ddim_step, strided_timesteps  # noqa: E402
from genscale.diffusion.schedule import NoiseSchedule  # noqa: E402
from genscale.metrics.reference import load_split  # noqa: E402

SCHEDULE = NoiseSchedule("cosine", 1000)  # the default ddpm preset's schedule
METHODS = [("DDIM", 20, 0.0), ("DDIM", 50, 0.0), ("ancestral", 20, 1.0), ("ancestral", 500, 1.0)]


def to_unit(images) -> torch.Tensor:
    """uint8 N x H x W x C -> float64 N x C x H x W in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).double() / 127.5 - 1.0


class ExactDenoiser:
    """eps_hat(x_t, t) of the empirical prior over ``atoms`` (M x C x H x W), exact in float64."""

    def __init__(self, atoms: torch.Tensor) -> None:
        self.atoms = atoms.flatten(1)  # M x D
        self.sq = self.atoms.square().sum(1)  # |y_i|^2

    def x0(self, x_t: torch.Tensor, abar: torch.Tensor) -> torch.Tensor:
        flat = x_t.flatten(1)
        # -|x - sqrt(a) y|^2 / (2 (1 - a)) up to terms constant in i
        logits = (math.sqrt(abar) * flat @ self.atoms.T - 0.5 * abar * self.sq) / (1 - abar)
        return (logits.softmax(1) @ self.atoms).view_as(x_t)

    def eps(self, x_t: torch.Tensor, abar: torch.Tensor) -> torch.Tensor:
        return (x_t - abar.sqrt() * self.x0(x_t, abar)) / (1 - abar).sqrt()


def denoise_all(model: ExactDenoiser, clean: torch.Tensor, t: int, seed: int) -> dict[str, float]:
    gen = torch.Generator().manual_seed(seed)
    abar = SCHEDULE.alphas_cumprod[t]
    x_t = abar.sqrt() * clean + (1 - abar).sqrt() * torch.randn(clean.shape, generator=gen, dtype=torch.float64)
    out = {"noisy": pooled_psnr((x_t / abar.sqrt()).clamp(-1, 1), clean),
           "blur": pooled_psnr(lowpass(x_t / abar.sqrt(), 1.0).clamp(-1, 1), clean),
           "one-step": pooled_psnr(model.x0(x_t, abar), clean)}
    for name, steps, eta in METHODS:
        x = x_t
        timesteps = strided_timesteps(t + 1, min(steps, t + 1))  # t down to 0, as --task denoise
        for i, s in enumerate(timesteps):
            a = SCHEDULE.alphas_cumprod[s]
            a_next = SCHEDULE.alphas_cumprod[timesteps[i + 1]] if i + 1 < len(timesteps) else torch.ones((), dtype=a.dtype)
            noise = torch.randn(x.shape, generator=gen, dtype=x.dtype) if eta > 0 else None
            x = ddim_step(x, model.eps(x, a), noise, a, a_next, eta, clip_x0=True)
        out[f"{name} {steps}"] = pooled_psnr(x, clean)
    return out


def main() -> None:
    num = int(sys.argv[1]) if len(sys.argv) > 1 else 359
    torch.manual_seed(0)
    _, train, _ = load_split("digits", "train", 8, 1)
    _, test, _ = load_split("digits", "test", 8, 1, limit=num)
    atoms = to_unit(train)
    model = ExactDenoiser(atoms)
    t = SCHEDULE.timesteps // 2
    picks = torch.randperm(len(atoms), generator=torch.Generator().manual_seed(1))[:num]
    rows = {"(A) prior's own digits": denoise_all(model, atoms[picks], t, 0),
            "(B) held-out digits": denoise_all(model, to_unit(test), t, 0)}
    print(f"exact denoiser of the empirical prior ({len(atoms)} training digits), t = {t}, "
          f"abar_t = {float(SCHEDULE.alphas_cumprod[t]):.3f}, {num} images; PSNR dB")
    names = list(next(iter(rows.values())))
    print(f"{'':26}" + "".join(f"{n:>15}" for n in names))
    for row, values in rows.items():
        print(f"{row:26}" + "".join(f"{values[n]:15.2f}" for n in names))
    a = rows["(A) prior's own digits"]
    print(f"(A) one-step - ancestral 500 = {a['one-step'] - a['ancestral 500']:.2f} dB "
          f"(exact posterior sampling: 10 log10 2 = {10 * math.log10(2):.2f} dB)")


if __name__ == "__main__":
    main()
