"""GroupNorm+SiLU: the Triton kernels (interpreter on CPU, compiled on CUDA) against float64 PyTorch."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import kernels

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}

# (N, C, groups, spatial): C not a multiple of 32, HW not a power of two, N=1, one group,
# one channel per group, a 1-D signal.
SHAPES = [
    (2, 6, 3, (7, 9)),
    (1, 96, 32, (3, 5)),
    (2, 8, 1, (4, 4)),
    (2, 4, 4, (5, 3)),
    (3, 6, 2, (10,)),
]


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-300))


def make_x(n: int, c: int, spatial: tuple[int, ...], channels_last: bool, device, dtype=torch.float32,
           shift: float = 0.5, scale: float = 2.0) -> torch.Tensor:
    """Fresh random input; channels_last puts C innermost in memory for any number of spatial dims."""
    if channels_last:
        x = torch.randn(n, *spatial, c, dtype=torch.float64).movedim(-1, 1)
    else:
        x = torch.randn(n, c, *spatial, dtype=torch.float64)
    return (x * scale + shift).to(device=device, dtype=dtype)


def reference(x, w, b, groups, dy, activation="silu"):
    """float64 forward and gradients through plain PyTorch ops."""
    x64 = x.detach().double().cpu().requires_grad_()
    w64 = w.detach().double().cpu().requires_grad_() if w is not None else None
    b64 = b.detach().double().cpu().requires_grad_() if b is not None else None
    # The formula itself, not F.group_norm: torch 2.11's CPU group_norm backward fails with a bias
    # but no weight ("tensor does not have a device"), seen on the GPU machine's PyTorch.
    n, c = x64.shape[0], x64.shape[1]
    xg = x64.reshape(n, groups, -1)
    mean = xg.mean(-1, keepdim=True)
    var = ((xg - mean) ** 2).mean(-1, keepdim=True)
    y = ((xg - mean) / torch.sqrt(var + 1e-5)).reshape(x64.shape)
    affine_shape = (1, c) + (1,) * (x64.dim() - 2)
    if w64 is not None:
        y = y * w64.reshape(affine_shape)
    if b64 is not None:
        y = y + b64.reshape(affine_shape)
    if activation == "silu":
        y = F.silu(y)
    y.backward(dy.detach().double().cpu())
    return y, x64.grad, (w64.grad if w is not None else None), (b64.grad if b is not None else None)


def run(x, w, b, groups, dy, activation="silu"):
    x = x.detach().requires_grad_()
    w = w.detach().requires_grad_() if w is not None else None
    b = b.detach().requires_grad_() if b is not None else None
    y = kernels.group_norm_silu(x, w, b, groups, activation=activation)
    y.backward(dy)
    return y, x.grad, (w.grad if w is not None else None), (b.grad if b is not None else None)


def channel_fast(t: torch.Tensor) -> bool:
    return t.stride(1) == 1


@pytest.fixture(params=["fused", "looped", "split"])
def path(request, monkeypatch) -> str:
    """The three strategies, forced; tiny tiles so every loop runs several times."""
    monkeypatch.setenv("GENSCALE_GN_PATH", request.param)
    if request.param != "fused":
        monkeypatch.setenv("GENSCALE_GN_BLOCK_S", "4")
        monkeypatch.setenv("GENSCALE_GN_SPLIT", "3")  # split: 3 spatial chunks merged per group
    return request.param


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, [s[0], s[1], s[2], *s[3]])))
def test_fp32_matches_float64(device, poison, path, shape, channels_last):
    n, c, g, spatial = shape
    x = make_x(n, c, spatial, channels_last, device)
    w = torch.randn(c, device=device)
    b = torch.randn(c, device=device)
    dy = make_x(n, c, spatial, channels_last, device, shift=0.0, scale=1.0)
    y, dx, dw, db = run(x, w, b, g, dy)
    ry, rdx, rdw, rdb = reference(x, w, b, g, dy)
    for name, out, ref in (("y", y, ry), ("dx", dx, rdx), ("dweight", dw, rdw), ("dbias", db, rdb)):
        assert rel_err(out, ref) <= 1e-5, name
    assert channel_fast(y) == channels_last and channel_fast(dx) == channels_last
    assert y.dtype == dx.dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
def test_half_precision(device, poison, path, dtype, channels_last):
    n, c, g, spatial = 2, 12, 4, (7, 9)
    x = make_x(n, c, spatial, channels_last, device, dtype)
    w = (1.0 + 0.5 * torch.randn(c)).to(device, dtype)
    b = (0.5 * torch.randn(c)).to(device, dtype)
    dy = make_x(n, c, spatial, channels_last, device, dtype, shift=0.0, scale=1.0)
    y, dx, dw, db = run(x, w, b, g, dy)
    ry, rdx, rdw, rdb = reference(x, w, b, g, dy)
    assert y.dtype == dx.dtype == dw.dtype == db.dtype == dtype
    for name, out, ref in (("y", y, ry), ("dx", dx, rdx), ("dweight", dw, rdw), ("dbias", db, rdb)):
        assert rel_err(out, ref) <= TOL[dtype], name


def test_bf16_activations_with_fp32_parameters(device, poison):
    """The autocast case: bf16 x, fp32 weight and bias -> bf16 y and dx, fp32 dweight and dbias."""
    x = make_x(2, 8, (5, 5), True, device, torch.bfloat16)
    w, b = torch.randn(8, device=device), torch.randn(8, device=device)
    dy = make_x(2, 8, (5, 5), True, device, torch.bfloat16, shift=0.0, scale=1.0)
    y, dx, dw, db = run(x, w, b, 2, dy)
    ry, rdx, rdw, rdb = reference(x, w, b, 2, dy)
    assert (y.dtype, dx.dtype, dw.dtype, db.dtype) == (torch.bfloat16, torch.bfloat16, torch.float32, torch.float32)
    assert max(rel_err(y, ry), rel_err(dx, rdx)) <= TOL[torch.bfloat16]
    # the parameter gradients are fp32 sums of exactly representable bf16 products' inputs:
    # held to fp32's bound, so an accumulation rounded through bf16 (~1e-3) fails
    assert max(rel_err(dw, rdw), rel_err(db, rdb)) <= TOL[torch.float32]


# Split-path loops that GPU plans reach at U-Net sizes but the tiny `path` settings above do not:
# several channel blocks with a group straddling two of them (CG=6 over blocks of 4), and the
# finalize kernel's loops over split chunks (70 chunks of 2 > its 64-wide block) and over a group's
# channels (CG=64 and 32 > its 16-wide channel block at that split).
SPLIT_PLANS = [
    ((2, 12, 2, (5, 6)), {"GENSCALE_GN_BLOCK_C": "4", "GENSCALE_GN_BLOCK_S": "8", "GENSCALE_GN_SPLIT": "3"}),
    ((1, 128, 2, (10, 14)), {"GENSCALE_GN_BLOCK_C": "64", "GENSCALE_GN_BLOCK_S": "1", "GENSCALE_GN_SPLIT": "70"}),
    ((1, 64, 2, (10, 14)), {"GENSCALE_GN_BLOCK_C": "32", "GENSCALE_GN_BLOCK_S": "1", "GENSCALE_GN_SPLIT": "70"}),
]


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("shape, env", SPLIT_PLANS, ids=["straddle", "split70-cg64", "split70-cg32"])
def test_split_path_channel_blocks_and_finalize_loops(device, poison, monkeypatch, shape, env, channels_last):
    monkeypatch.setenv("GENSCALE_GN_PATH", "split")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    n, c, g, spatial = shape
    x = make_x(n, c, spatial, channels_last, device)
    w, b = torch.randn(c, device=device), torch.randn(c, device=device)
    dy = make_x(n, c, spatial, channels_last, device, shift=0.0, scale=1.0)
    for name, out, ref in zip(("y", "dx", "dweight", "dbias"), run(x, w, b, g, dy), reference(x, w, b, g, dy)):
        assert rel_err(out, ref) <= 1e-5, name


@pytest.mark.parametrize("affine", ["none", "weight", "bias"])
def test_plain_group_norm_and_optional_affine(device, poison, path, affine):
    n, c, g, spatial = 2, 6, 3, (4, 5)
    x = make_x(n, c, spatial, False, device)
    w = torch.randn(c, device=device) if affine == "weight" else None
    b = torch.randn(c, device=device) if affine == "bias" else None
    dy = make_x(n, c, spatial, False, device, shift=0.0, scale=1.0)
    outs = run(x, w, b, g, dy, activation=None)
    refs = reference(x, w, b, g, dy, activation=None)
    for out, ref in zip(outs, refs):
        assert (out is None) == (ref is None)
        if ref is not None:
            assert rel_err(out, ref) <= 1e-5


def test_statistics_are_stable_for_a_large_mean(device, path):
    """Mean 300, std 1: E[x^2] - mean^2 in fp32 would lose ~3 digits of the variance."""
    x = make_x(2, 8, (6, 6), False, device, shift=300.0, scale=1.0)
    w, b = torch.randn(8, device=device), torch.randn(8, device=device)
    y = kernels.group_norm_silu(x, w, b, 2)
    ref = F.silu(F.group_norm(x.double().cpu(), 2, w.double().cpu(), b.double().cpu(), 1e-5))
    assert rel_err(y, ref) <= 1e-4


def test_parameter_gradients_are_deterministic(device, path):
    x = make_x(1, 96, (6, 6), True, device)
    w, b = torch.randn(96, device=device), torch.randn(96, device=device)
    dy = make_x(1, 96, (6, 6), True, device, shift=0.0, scale=1.0)
    first, second = run(x, w, b, 32, dy), run(x, w, b, 32, dy)
    for a, b_ in zip(first, second):
        assert torch.equal(a, b_)


def test_channel_slice_and_spatial_crop_inputs(device, poison):
    """A channel slice runs in place through its strides; a spatial crop (not collapsible) is copied first."""
    base = make_x(2, 12, (6, 7), False, device)
    w, b = torch.randn(6, device=device), torch.randn(6, device=device)
    for x in (base[:, 3:9], base[:, :6, 1:5, 2:6]):
        dy = torch.randn(x.shape, device=device)
        y, dx, dw, db = run(x, w, b, 3, dy)
        ry, rdx, rdw, rdb = reference(x, w, b, 3, dy)
        assert max(rel_err(y, ry), rel_err(dx, rdx), rel_err(dw, rdw), rel_err(db, rdb)) <= 1e-5


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(1, 128, 32, 32), (8, 256, 16, 16), (16, 512, 8, 8), (2, 64, 64, 64)])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
def test_unet_shapes_with_automatic_plan(shape, channels_last, monkeypatch):
    """The launch planner's own choices (fused or split, split factor) at U-Net sizes on the GPU."""
    if not torch.cuda.is_available():
        pytest.skip("CUDA is not available")
    monkeypatch.setenv("GENSCALE_KERNELS", "triton")
    n, c, h, w_ = shape
    x = make_x(n, c, (h, w_), channels_last, "cuda", torch.bfloat16)
    w, b = torch.randn(c, device="cuda"), torch.randn(c, device="cuda")
    dy = make_x(n, c, (h, w_), channels_last, "cuda", torch.bfloat16, shift=0.0, scale=1.0)
    y, dx, dw, db = run(x, w, b, 32, dy)
    ry, rdx, rdw, rdb = reference(x, w, b, 32, dy)
    assert max(rel_err(y, ry), rel_err(dx, rdx)) <= 1e-2
    assert max(rel_err(dw, rdw), rel_err(db, rdb)) <= 1e-3


@pytest.mark.parametrize("backend", ["eager", "triton"])
def test_groups_must_divide_channels(monkeypatch, backend):
    monkeypatch.setenv("GENSCALE_KERNELS", backend)
    with pytest.raises(ValueError, match=r"C=6.*num_groups=4"):
        kernels.group_norm_silu(torch.randn(1, 6, 2, 2), None, None, 4)
    with pytest.raises(ValueError, match="activation"):
        kernels.group_norm_silu(torch.randn(1, 6, 2, 2), None, None, 3, activation="relu")


def test_cpu_fallback_is_the_eager_reference(monkeypatch):
    monkeypatch.delenv("GENSCALE_KERNELS", raising=False)
    x = make_x(2, 6, (5, 4), True, "cpu")
    w, b = torch.randn(6), torch.randn(6)
    y = kernels.group_norm_silu(x, w, b, 3)
    assert torch.equal(y, F.silu(F.group_norm(x, 3, w, b, 1e-5)))
    assert y.is_contiguous(memory_format=torch.channels_last)
    yb = kernels.group_norm_silu(x.bfloat16(), w, b, 3)
    assert yb.dtype == torch.bfloat16
    assert rel_err(yb, F.silu(F.group_norm(x.bfloat16().double(), 3, w.double(), b.double()))) <= 1e-2


def spy_launches(monkeypatch, what) -> list:
    """A list that receives what(launch) for every kernel launch the GroupNorm wrappers make."""
    from kernels import _group_norm_ops

    launched = []
    real_call = _group_norm_ops._Launch.__call__
    monkeypatch.setattr(_group_norm_ops._Launch, "__call__",
                        lambda self, k, *t, **kw: launched.append(what(self)) or real_call(self, k, *t, **kw))
    return launched


def test_launch_plans_follow_the_tuning_environment(device, monkeypatch):
    """Launch specs are cached per shape; a changed override must still change what is launched
    (the tests above force each strategy through the environment on the same shapes)."""
    launched = spy_launches(monkeypatch, lambda launch: launch.kernel)
    x = make_x(2, 6, (5, 7), False, device)
    dy = make_x(2, 6, (5, 7), False, device, shift=0.0, scale=1.0)
    w, b = torch.randn(6, device=device), torch.randn(6, device=device)
    expected = reference(x, w, b, 3, dy)
    for path, kernels_run in (("fused", ["gn_fwd_fused", "gn_bwd_fused"]),
                              ("split", ["gn_stats_partial", "gn_stats_finalize", "gn_apply",
                                         "gn_bwd_partial", "gn_bwd_finalize", "gn_bwd_apply"]),
                              ("fused", ["gn_fwd_fused", "gn_bwd_fused"])):
        monkeypatch.setenv("GENSCALE_GN_PATH", path)
        launched.clear()
        got = run(x, w, b, 3, dy)
        assert launched == kernels_run, path
        for out, ref in zip(got, expected):
            assert rel_err(out, ref) <= 1e-5


@pytest.mark.parametrize("group_block", ["2", "4"])
def test_forced_group_block_with_a_partial_last_block(device, monkeypatch, group_block):
    """GENSCALE_GN_GROUP_BLOCK (tuning) packs several groups per program; with 6 groups and 4 per
    program the second program holds 2 real groups and 2 masked ones."""
    monkeypatch.setenv("GENSCALE_GN_PATH", "fused")
    monkeypatch.setenv("GENSCALE_GN_GROUP_BLOCK", group_block)
    launched = spy_launches(monkeypatch, lambda launch: launch.meta["GB"])
    x = make_x(2, 12, (3, 5), True, device)
    dy = make_x(2, 12, (3, 5), True, device, shift=0.0, scale=1.0)
    w, b = torch.randn(12, device=device), torch.randn(12, device=device)
    for out, ref in zip(run(x, w, b, 6, dy), reference(x, w, b, 6, dy)):
        assert rel_err(out, ref) <= 1e-5
    assert launched == [int(group_block)] * 2  # forward and backward


@pytest.mark.parametrize("stages", ["1", "3"])
def test_forced_loop_tile_and_stages(device, monkeypatch, stages):
    """GENSCALE_GN_LOOP_TILE (tuning) sets the looped plan's tile: 64 elements over 2 channels
    per group -> 32 positions per tile, so 7x9 = 63 positions take two tiles, the second partial.
    GENSCALE_GN_LOOP_STAGES pipelines the loops' loads (compiled kernels; the interpreter runs
    the same loop)."""
    monkeypatch.setenv("GENSCALE_GN_PATH", "looped")
    monkeypatch.setenv("GENSCALE_GN_LOOP_TILE", "64")
    monkeypatch.setenv("GENSCALE_GN_LOOP_STAGES", stages)
    launched = spy_launches(monkeypatch, lambda launch: (launch.meta["SINGLE"], launch.meta["BLOCK_S"],
                                                         launch.meta["STAGES"]))
    x = make_x(2, 6, (7, 9), False, device)
    dy = make_x(2, 6, (7, 9), False, device, shift=0.0, scale=1.0)
    w, b = torch.randn(6, device=device), torch.randn(6, device=device)
    for out, ref in zip(run(x, w, b, 3, dy), reference(x, w, b, 3, dy)):
        assert rel_err(out, ref) <= 1e-5
    assert launched == [(False, 32, int(stages))] * 2  # forward and backward
