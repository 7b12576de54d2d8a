"""Compile every Triton kernel variant the benchmarks launch, for sm_90, without a GPU.

Triton's NVIDIA backend (LLVM and the bundled ptxas) runs on any x86 machine: a stand-in driver
reports an sm_90 target, launches become compile-only warm-ups, and the real launchers run on
CPU tensors with the launch plans a 132-SM H100 would get. For each kernel variant this prints
registers, spills and shared memory (ptxas -v), for the (loop-free) noise kernels the sm_90a SASS
instructions per element (ptxas + nvdisasm), and the global load/store widths in the PTX:
compile errors, spills and scalar accesses show up here at no device time.

Usage: python benchmarks/aot_report.py [--ptx-dir DIR]   (TRITON_INTERPRET must be unset)
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.pop("TRITON_INTERPRET", None)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
os.environ["GENSCALE_TRITON_LAUNCH"] = "jit"  # compile-only: nothing may be loaded for direct launches

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import driver  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

SMS = 132


class _Sm90:
    """Just enough of a driver for Triton to compile for an H100."""

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0


def _install(compiled: list) -> None:
    driver.set_active(_Sm90())
    run = JITFunction.run

    def compile_only(self, *args, grid, warmup, **kwargs):
        kernel = run(self, *args, grid=grid, warmup=True, **kwargs)
        meta = {k: v for k, v in kwargs.items() if k.isupper()}
        meta["layout"] = "cl" if args[0].dim() == 4 and args[0].stride(1) == 1 and args[0].shape[1] > 1 else "nchw"
        meta["dtype"] = str(args[0].dtype)[6:]
        compiled.append((self.fn.__name__, meta, kernel))
        return kernel

    JITFunction.run = compile_only
    import kernels._dispatch
    import kernels._group_norm_ops as gn_ops
    import kernels._noise_ops as noise_ops
    import kernels.group_norm
    import kernels.noise

    gn_ops.sm_count = noise_ops.sm_count = lambda device: SMS
    for module in (kernels.group_norm, kernels.noise):
        module.use_triton = lambda *tensors: True


def _launch_all() -> None:
    import kernels
    import kernels._group_norm_ops as gn_ops

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import test_bench_group_norm as bgn
    import test_bench_noise as bnoise

    shapes = [(s, torch.bfloat16) for s in bgn.GPU_SHAPES] + [(s, torch.float32) for s in bgn.GPU_FP32_SHAPES]
    for (n, c, h, w), dtype in shapes:
        for fmt in (torch.contiguous_format, torch.channels_last):
            x = torch.empty(n, c, h, w, dtype=dtype).contiguous(memory_format=fmt)
            wt, bs = torch.empty(c, dtype=dtype), torch.empty(c, dtype=dtype)
            y, mean, rstd = gn_ops.forward(x, wt, bs, 32, 1e-5, True)
            gn_ops.backward(torch.empty_like(x), x, wt, bs, mean, rstd, 32, True)
    abar = torch.linspace(0.999, 0.01, 1000, dtype=torch.float64)
    for shape, dtype in bnoise.GPU_CASES:
        x = torch.zeros(shape, dtype=dtype)
        t = torch.zeros(shape[0], dtype=torch.int64)
        kernels.q_sample(x, t, abar, seed=1, offset=2)
        kernels.q_sample(x, t, abar, x)
        kernels.philox_normal(x, 1, 2)
        kernels.ddpm_step(x, x, t, abar, eps_cond=x, guidance_scale=3.0, clip_x0=True, seed=1, offset=2)
        kernels.ddim_step(x, x, t, t - 1, abar, eps_cond=x, guidance_scale=3.0)
        pred = x.clone().requires_grad_()
        kernels.eps_loss(pred, 1, 2).backward()
        seed = torch.ones(1, dtype=torch.int64)  # the seed read from memory (SEED_PTR), as under CUDA graphs
        kernels.q_sample(x, t, abar, seed=seed, offset=2)
        pred = x.clone().requires_grad_()
        kernels.eps_loss(pred, seed, 2).backward()


def _ptxas(ptx: str) -> str:
    """ptxas -v on the PTX, with whichever bundled ptxas accepts its .version."""
    arch = re.search(r"\.target\s+(sm_\w+)", ptx)
    bindir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as fh:
        fh.write(ptx)
    try:
        report = ""
        for ptxas in sorted(bindir.glob("ptxas*"), reverse=True):
            out = subprocess.run([str(ptxas), f"-arch={arch.group(1) if arch else 'sm_90a'}", "-v", "-o", os.devnull,
                                  fh.name], capture_output=True, text=True, timeout=120)
            report = out.stdout + out.stderr
            if out.returncode == 0:
                break
        return report
    finally:
        os.unlink(fh.name)


def _sass_per_element(ptx: str, meta: dict, num_warps: int) -> str:
    """Static SASS instructions per element: the noise kernels are straight-line code (no loops), so
    this is what each thread executes over the elements it owns: the measure of a compute-bound
    drawing kernel. "-" for the GroupNorm kernels (loops) or without the bundled ptxas/nvdisasm."""
    if "BLOCK_C" not in meta or "BLOCK_S" not in meta or "FAST_MATH" not in meta:
        return "-"
    bindir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "k.ptx").write_text(ptx)
        for ptxas in sorted(bindir.glob("ptxas*"), reverse=True):
            if subprocess.run([str(ptxas), "-arch=sm_90a", "-o", f"{tmp}/k.cubin", f"{tmp}/k.ptx"],
                              capture_output=True, timeout=120).returncode == 0:
                break
        else:
            return "-"
        sass = subprocess.run([str(bindir / "nvdisasm"), "-c", f"{tmp}/k.cubin"], capture_output=True, text=True,
                              timeout=120).stdout
    instructions = len(re.findall(r"/\*[0-9a-f]{4}\*/", sass))  # nvdisasm prefixes each with its offset
    return f"{instructions / (meta['BLOCK_C'] * meta['BLOCK_S'] / (32 * num_warps)):.1f}"


def _widths(ptx: str, op: str) -> str:
    counts: dict[str, int] = {}
    for m in re.finditer(rf"\b{op}\.global((?:\.\w+)*?)\.(v[248]\.)?[bfsu](8|16|32|64)\b", ptx):
        vec = m.group(2)[:-1] if m.group(2) else "v1"
        key = f"{vec}.{m.group(3)}"
        counts[key] = counts.get(key, 0) + 1
    return " ".join(f"{k}:{v}" for k, v in sorted(counts.items())) or "-"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ptx-dir", help="also write each variant's PTX here")
    args = parser.parse_args()
    compiled: list = []
    _install(compiled)
    _launch_all()
    seen = set()
    print(f"{'kernel':22} {'constexprs, first tensor':58} {'warps':>5} {'regs':>4} {'spill':>5} {'smem':>6} "
          f"{'sass/el':>7}  loads / stores")
    for name, meta, kernel in compiled:
        key = kernel.hash if hasattr(kernel, "hash") else id(kernel)
        if key in seen:
            continue
        seen.add(key)
        ptx = kernel.asm["ptx"]
        report = _ptxas(ptx)
        regs = re.search(r"Used (\d+) registers", report)
        spill = re.search(r"(\d+) bytes spill stores", report)
        consts = ",".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in meta.items()
                          if k not in ("HAS_W", "HAS_B"))
        print(f"{name:22} {consts[:58]:58} {kernel.metadata.num_warps:>5} {regs.group(1) if regs else '?':>4} "
              f"{spill.group(1) if spill else '?':>5} {kernel.metadata.shared:>6} "
              f"{_sass_per_element(ptx, meta, kernel.metadata.num_warps):>7}  "
              f"{_widths(ptx, 'ld')} / {_widths(ptx, 'st')}")
        if args.ptx_dir:
            Path(args.ptx_dir).mkdir(parents=True, exist_ok=True)
            (Path(args.ptx_dir) / f"{name}-{len(seen)}.ptx").write_text(ptx)


if __name__ == "__main__":
    main()
