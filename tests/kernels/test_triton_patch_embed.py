"""Triton patch embedding (interpreted on CPU): tokens and the input/weight/bias/pos_embed
gradients against F.conv2d / F.conv3d, strided inputs, dtype checks, and a nano ViT that gives
the same output and gradients through backend "triton" as through torch."""

import pytest
import torch
import torch.nn.functional as F

from pretrain import kernels
from tests.kernels.conftest import DEVICE, skip_unless_triton_usable

pytestmark = skip_unless_triton_usable()
from pretrain.kernels import triton_patch_embed as tpe  # noqa: E402 - after the skip when triton is absent
from pretrain.models.vit import ViTConfig, VisionTransformer  # noqa: E402


def conv_reference(x, weight, bias, patch, pos_embed):
    conv = F.conv2d if len(patch) == 2 else F.conv3d
    tokens = conv(x, weight, bias, stride=patch).flatten(2).transpose(1, 2)
    return tokens if pos_embed is None else tokens + pos_embed


def make_inputs(x_shape, patch, features, dtype, with_bias=True, pos_batch=1, seed=0):
    gen = torch.Generator().manual_seed(seed)
    grid = [s // p for s, p in zip(x_shape[2:], patch)]
    tensors = {
        "x": torch.randn(x_shape, generator=gen),
        "weight": torch.randn(features, x_shape[1], *patch, generator=gen) / 4,
        "bias": torch.randn(features, generator=gen) if with_bias else None,
        "pos_embed": torch.randn(pos_batch, int(torch.tensor(grid).prod()), features, generator=gen)
        if pos_batch else None,
    }
    return {n: None if t is None else t.to(DEVICE, dtype).requires_grad_() for n, t in tensors.items()}


@pytest.mark.parametrize(
    "x_shape,patch,features,with_bias,pos_batch",
    [
        ((2, 3, 12, 18), (4, 6), 5, True, 1),
        ((3, 1, 16, 16), (4, 4), 70, False, 0),
        ((2, 2, 4, 6, 8), (2, 3, 4), 7, True, 2),
        ((1, 1, 8, 8, 8), (4, 4, 4), 33, True, 1),
        ((2, 4, 8, 16, 16), (8, 8, 8), 9, False, 0),  # K = 2048 columns: several K tiles
    ],
)
def test_forward_and_all_gradients_match_conv_fp32(x_shape, patch, features, with_bias, pos_batch):
    inputs = make_inputs(x_shape, patch, features, torch.float32, with_bias, pos_batch)
    ours = kernels.patch_embed(
        inputs["x"], inputs["weight"], inputs["bias"], patch, pos_embed=inputs["pos_embed"], backend="triton"
    )
    want = conv_reference(inputs["x"], inputs["weight"], inputs["bias"], patch, inputs["pos_embed"])
    torch.testing.assert_close(ours, want, atol=1e-5, rtol=1e-5)
    grad = torch.randn(want.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    leaves = {n: t for n, t in inputs.items() if t is not None}
    got = torch.autograd.grad(ours, tuple(leaves.values()), grad)
    expected = torch.autograd.grad(want, tuple(leaves.values()), grad)
    for name, g, e in zip(leaves, got, expected):
        assert g.shape == e.shape, name
        torch.testing.assert_close(g, e, atol=1e-4, rtol=1e-5, msg=lambda m: f"grad {name}: {m}")


@pytest.mark.parametrize("x_shape,patch", [((2, 3, 16, 24), (8, 8)), ((2, 1, 8, 8, 16), (4, 4, 8))])
def test_fp16_forward_and_gradients(x_shape, patch):
    inputs = make_inputs(x_shape, patch, 24, torch.float16, seed=2)
    ours = kernels.patch_embed(
        inputs["x"], inputs["weight"], inputs["bias"], patch, pos_embed=inputs["pos_embed"], backend="triton"
    )
    assert ours.dtype == torch.float16
    as64 = {n: t.detach().double().requires_grad_() for n, t in inputs.items()}
    want = conv_reference(as64["x"], as64["weight"], as64["bias"], patch, as64["pos_embed"])
    torch.testing.assert_close(ours.double(), want, atol=1e-2, rtol=1e-2)
    grad = torch.randn(want.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64).to(DEVICE)
    got = torch.autograd.grad(ours, tuple(inputs.values()), grad.half())
    expected = torch.autograd.grad(want, tuple(as64.values()), grad)
    for name, g, e in zip(inputs, got, expected):
        assert g.dtype == torch.float16, name
        torch.testing.assert_close(g.double(), e, atol=5e-2, rtol=1e-2, msg=lambda m: f"grad {name}: {m}")


def test_strided_input_is_gathered_in_place():
    """A channels-last image and a cropped volume view are read through their strides, no copy needed."""
    gen = torch.Generator().manual_seed(4)
    image = torch.randn(2, 3, 16, 16, generator=gen).to(DEVICE).to(memory_format=torch.channels_last)
    weight = torch.randn(8, 3, 8, 8, generator=gen).to(DEVICE)
    torch.testing.assert_close(
        tpe.triton_patch_embed(image, weight, None, (8, 8)), conv_reference(image, weight, None, (8, 8), None),
        atol=1e-5, rtol=1e-5,
    )
    volume = torch.randn(1, 2, 10, 12, 9, generator=gen).to(DEVICE)[:, :, 1:9, 2:10, :8]
    weight3 = torch.randn(4, 2, 4, 4, 4, generator=gen).to(DEVICE)
    torch.testing.assert_close(
        tpe.triton_patch_embed(volume, weight3, None, (4, 4, 4)),
        conv_reference(volume, weight3, None, (4, 4, 4), None),
        atol=1e-5, rtol=1e-5,
    )


def test_mixed_dtypes_are_refused_with_the_dtypes_named():
    x = torch.randn(1, 1, 8, 8, dtype=torch.float16, device=DEVICE)
    weight = torch.randn(4, 1, 4, 4, device=DEVICE)
    with pytest.raises(RuntimeError, match=r"'triton' was selected but cannot run: .*'x': torch.float16"):
        kernels.patch_embed(x, weight, None, 4, backend="triton")


def test_nano_vit_matches_torch_backends():
    """Same output and parameter gradients with both kernels on "triton" as on "torch" (head_dim 32)."""
    cfg = ViTConfig(preset="nano", img_size=16, patch_size=8, in_chans=2)
    torch.manual_seed(0)
    model = VisionTransformer(cfg).to(DEVICE)
    x = torch.randn(2, 2, 16, 16, generator=torch.Generator().manual_seed(5)).to(DEVICE)

    def run():
        model.zero_grad()
        out = model(x)
        out.square().sum().backward()
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    kernels.configure(attention="torch", patch_embed="torch")
    want_out, want_grads = run()
    kernels.configure(attention="triton", patch_embed="triton")
    assert kernels.resolve("attention", x.device).name == kernels.resolve("patch_embed", x.device).name == "triton"
    got_out, got_grads = run()
    torch.testing.assert_close(got_out, want_out, atol=1e-4, rtol=1e-4)
    assert got_grads.keys() == want_grads.keys()
    for name in want_grads:
        torch.testing.assert_close(got_grads[name], want_grads[name], atol=1e-4, rtol=1e-3, msg=lambda m: f"{name}: {m}")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 and large shapes need a CUDA GPU")
@pytest.mark.parametrize("x_shape,patch", [((8, 3, 224, 224), (16, 16)), ((2, 1, 96, 96, 96), (16, 16, 16))])
def test_gpu_bf16_large_shapes_match_conv(x_shape, patch):
    inputs = make_inputs(x_shape, patch, 768, torch.bfloat16, seed=6)
    ours = kernels.patch_embed(
        inputs["x"], inputs["weight"], inputs["bias"], patch, pos_embed=inputs["pos_embed"], backend="triton"
    )
    as32 = {n: t.detach().float().requires_grad_() for n, t in inputs.items()}
    want = conv_reference(as32["x"], as32["weight"], as32["bias"], patch, as32["pos_embed"])
    torch.testing.assert_close(ours.float(), want, atol=5e-2, rtol=2e-2)
    grad = torch.randn_like(want)
    got = torch.autograd.grad(ours, tuple(inputs.values()), grad.bfloat16())
    expected = torch.autograd.grad(want, tuple(as32.values()), grad)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g.float(), e, atol=0.5, rtol=5e-2)
