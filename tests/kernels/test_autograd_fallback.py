"""The compiled and Triton kernels are forward-only; when autograd records, every op must take its differentiable
reference path so training (e.g. the projector in stage 1) gets correct gradients."""

import torch

import nvlm_kernels as nk
from nvlm_kernels import packing


def _grads(fn, *inputs):
    inputs = [t.detach().clone().requires_grad_(True) for t in inputs]
    fn(*inputs).square().sum().backward()
    return [t.grad for t in inputs]


def test_pixel_shuffle_layernorm_gradients_match_the_reference():
    x, w, b = torch.randn(2, 16, 6), torch.randn(24), torch.randn(24)
    got = _grads(lambda *t: nk.pixel_shuffle_layernorm(*t), x, w, b)
    want = _grads(lambda *t: nk.pixel_shuffle_layernorm_ref(*t), x, w, b)
    for g, r in zip(got, want):
        assert g is not None
        torch.testing.assert_close(g, r)


def test_pixel_shuffle_gradient_is_the_inverse_permutation():
    x = torch.randn(1, 16, 3)
    (g,) = _grads(lambda t: nk.pixel_shuffle(t), x)
    torch.testing.assert_close(g, 2 * x)          # d/dx sum(P(x)^2) = 2x for a permutation P


def test_tiled_attention_with_qk_norm_gradients_match_the_reference():
    q, k, v = torch.randn(3, 1, 2, 5, 64).unbind(0)
    wq, wk = torch.rand(128) + 0.5, torch.rand(128) + 0.5
    fn = lambda *t: nk.tiled_attention(t[0], t[1], t[2], q_norm_weight=t[3], k_norm_weight=t[4])
    ref = lambda *t: nk.tiled_attention_ref(t[0], t[1], t[2], q_norm_weight=t[3], k_norm_weight=t[4])
    for g, r in zip(_grads(fn, q, k, v, wq, wk), _grads(ref, q, k, v, wq, wk)):
        assert g is not None
        torch.testing.assert_close(g, r)


def test_quantised_linears_pass_gradients_to_their_input():
    x, w = torch.randn(3, 128), torch.randn(16, 128)
    q8, s8 = packing.quantize_int8(w)
    q4, s4, z4 = packing.quantize_int4(w, group_size=64)
    (g8,) = _grads(lambda t: nk.w8a16_linear(t, q8, s8), x)
    (g4,) = _grads(lambda t: nk.w4a16_linear(t, q4, s4, z4, 64), x)
    torch.testing.assert_close(g8, _grads(lambda t: nk.w8a16_linear_ref(t, q8, s8), x)[0])
    torch.testing.assert_close(g4, _grads(lambda t: nk.w4a16_linear_ref(t, q4, s4, z4, 64), x)[0])
