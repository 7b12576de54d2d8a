"""The measurements behind docs/applications.md, on a trained digits ddpm run, with the digits judge.

    GENSCALE_THREADS=1 OMP_NUM_THREADS=1 python scripts/measure_applications.py runs/ddpm [anagram,hybrid,denoise,sdedit]

Prints one line per measurement and a JSON summary at the end. RePaint is measured by the harness
itself: ``python genscale/evaluate.py --run runs/ddpm --metric psnr --mask centre`` (and ``mixed``).
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from genscale.applications.anagram import anagram  # noqa: E402
from genscale.applications.denoise import denoise  # noqa: E402
from genscale.applications.filters import lowpass  # noqa: E402
from genscale.applications.hybrid import hybrid  # noqa: E402
from genscale.applications.inputs import load_images, to_tensor  # noqa: E402
from genscale.applications.model import DiffusionModel  # noqa: E402
from genscale.applications.sdedit import distances, sdedit  # noqa: E402
from genscale.applications.views import get_view  # noqa: E402
from genscale.metrics.judge import load_or_train_judge, predict  # noqa: E402
from genscale.sample import load_family  # noqa: E402

SEEDS = 50  # one image per seed
STEPS = 50


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def measure_anagram(dm: DiffusionModel, judge) -> dict:
    """6 / 9 under the 180-degree rotation: the image judged 6 and its rotated view 9."""
    views = [get_view("identity"), get_view("rot180")]
    hits = []
    for seed in range(SEEDS):
        image = anagram(dm, 1, views, [6, 9], cfg_scale=dm.default_cfg, steps=STEPS, generator=seeded(seed))
        hits.append(predict(judge, image)[0] == 6 and predict(judge, views[1].apply(image))[0] == 9)
    return {"anagram_6_9_rot180": float(np.mean(hits))}


def measure_hybrid(dm: DiffusionModel, family, judge, pairs=((3, 9), (8, 1))) -> dict:
    """Blurred output judged the low-pass class and sharp output the high-pass class; the control
    is how often plain samples of the high class, blurred the same way, already read as the low one."""
    out = {}
    for low, high in pairs:
        both, blurred_low, sharp_high = [], [], []
        for seed in range(SEEDS):
            image = hybrid(dm, 1, low, high, sigma=1.0, cfg_scale=dm.default_cfg, steps=STEPS, generator=seeded(seed))
            blurred, sharp = predict(judge, lowpass(image, 1.5))[0], predict(judge, image)[0]
            both.append(blurred == low and sharp == high)
            blurred_low.append(blurred == low)
            sharp_high.append(sharp == high)
        plain = family.sample(SEEDS, labels=torch.full((SEEDS,), high), generator=seeded(0))
        control = float(np.mean(predict(judge, lowpass(plain, 1.5)) == low))
        out[f"hybrid_{low}_{high}"] = {"both": float(np.mean(both)), "blurred_is_low": float(np.mean(blurred_low)),
                                       "sharp_is_high": float(np.mean(sharp_high)),
                                       "control_plain_high_blurred_read_as_low": control}
    return out


def measure_denoise(dm: DiffusionModel, x: torch.Tensor) -> dict:
    """PSNR of blur, one-step and iterative denoising at t = T/2 (DDIM 20 and 50 steps, ancestral 20)."""
    t = dm.timesteps // 2
    out = {}
    for steps, eta in [(20, 0.0), (50, 0.0), (20, 1.0)]:
        result = denoise(dm, x, t, steps=steps, eta=eta, generator=seeded(0))
        out[f"denoise_t{t}_steps{steps}_eta{eta}"] = {k: round(v, 3) for k, v in result.psnr().items()}
    return out


def measure_sdedit(dm: DiffusionModel, x: torch.Tensor, labels: np.ndarray) -> dict:
    """RMS distance to the guide per noise level, unguided and guided toward another class."""
    levels = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]
    guides = x[:100]
    out = {}
    for name, target in [("unconditional", None), ("toward_label_plus_3", torch.from_numpy((labels[:100] + 3) % 10))]:
        cfg = dm.default_cfg if target is not None else 1.0
        d = distances(sdedit(dm, guides, levels, labels=target, cfg_scale=cfg, steps=STEPS, generator=seeded(0)), guides)
        out[f"sdedit_{name}"] = {"distances": dict(zip(map(str, levels), [round(v, 4) for v in d])),
                                 "monotone": bool(all(b > a for a, b in zip(d, d[1:])))}
    return out


def main() -> None:
    run = sys.argv[1]
    parts = sys.argv[2].split(",") if len(sys.argv) > 2 else ["anagram", "hybrid", "denoise", "sdedit"]
    family, info, step = load_family(run, "cpu")
    dm, judge = DiffusionModel(family), load_or_train_judge("digits")
    print(f"run {run}, step {step}, cfg {dm.default_cfg}", flush=True)
    images, labels = load_images(None, run, info.image_size, info.channels, 10000)  # the held-out split
    x = to_tensor(images)
    jobs = {"anagram": lambda: measure_anagram(dm, judge), "hybrid": lambda: measure_hybrid(dm, family, judge),
            "denoise": lambda: measure_denoise(dm, x), "sdedit": lambda: measure_sdedit(dm, x, labels)}
    summary = {}
    for part in parts:
        start = time.time()
        result = jobs[part]()
        print(part, json.dumps(result), f"({time.time() - start:.0f} s)", flush=True)
        summary.update(result)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
