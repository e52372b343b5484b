"""Every SAE family: its loss against a hand computation on small tensors, its inference rule,
and a checkpoint that loads back as the variant it was saved as."""

from __future__ import annotations

import math

import pytest
import torch

from vitscope.sae import (
    BatchTopKSae,
    JumpReluSae,
    LossContext,
    MatryoshkaSae,
    Sae,
    SaeConfig,
    SaeRecord,
    TopKSae,
    build_sae,
    load_sae,
    load_sae_from,
    save_sae,
)
from vitscope.store import LocalStore

W_ENC = [[1.0, -1.0, 0.5], [0.0, 2.0, -1.0]]
B_ENC = [0.0, -1.0, 1.25]
W_DEC = [[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]]  # unit rows
B_DEC = [0.5, -0.5]


def hand_sae(variant: str, **cfg) -> Sae:
    """d_in=2, d_sae=3 with the weights above."""
    sae = build_sae(SaeConfig.of(variant, 2, 3, **cfg))
    with torch.no_grad():
        sae.W_enc.copy_(torch.tensor(W_ENC))
        sae.b_enc.copy_(torch.tensor(B_ENC))
        sae.W_dec.copy_(torch.tensor(W_DEC))
        sae.b_dec.copy_(torch.tensor(B_DEC))
    return sae


def test_registry_knows_every_family():
    assert {"relu", "topk", "batchtopk", "matryoshka", "jumprelu"} <= set(Sae.registry)
    with pytest.raises(ValueError, match="unknown SAE variant 'nope'"):
        build_sae(SaeConfig.of("nope", 2, 3))
    with pytest.raises(ValueError, match="needs 0 < k <= d_sae"):
        build_sae(SaeConfig.of("topk", 2, 3, k=4))
    with pytest.raises(ValueError, match="prefixes must ascend"):
        build_sae(SaeConfig.of("matryoshka", 2, 4, k=1, prefixes=(2, 1, 4)))


@pytest.mark.parametrize("sparse", [False, True])
def test_topk_loss_with_auxk_matches_a_hand_computation(sparse):
    sae = hand_sae("topk", k=1, aux_coeff=0.5)
    sae.sparse_decode = sae.sparse_encode = sparse
    x = torch.tensor([[1.5, 0.5], [0.5, 1.5]])
    # Row 1: x - b_dec = (1, 1); pre = (1, 0, -0.5) + b_enc = (1, -1, 0.75): keep latent 0 (1)
    #        x_hat = (1, 0) + b_dec = (1.5, -0.5); e = x - x_hat = (0, 1); |e|^2 = 1
    # Row 2: x - b_dec = (0, 2); pre = (0, 4, -2) + b_enc = (0, 3, -0.75): keep latent 1 (3)
    #        x_hat = (0, 3) + b_dec = (0.5, 2.5); e = (0, -1); |e|^2 = 1
    # AuxK, latent 2 dead, aux_k = d_in // 2 = 1, scale = min(1 / 1, 1) = 1:
    #   row 1: relu(0.75) * (0.6, 0.8) = (0.45, 0.6); |e - e_hat|^2 = 0.45^2 + 0.4^2 = 0.3625
    #   row 2: relu(-0.75) = 0, e_hat = 0; |e|^2 = 1
    dead = torch.tensor([False, False, True])
    parts = sae.loss(x, LossContext(dead_mask=dead))
    assert parts.recon.item() == pytest.approx(1.0)
    assert parts.terms["aux"].item() == pytest.approx((0.3625 + 1) / 2)
    assert parts.loss.item() == pytest.approx(1.0 + 0.5 * (0.3625 + 1) / 2)
    assert parts.fires.tolist() == [1, 1, 0] and parts.l0.item() == 1.0
    # No dead latent: no auxiliary loss.
    parts = sae.loss(x, LossContext(dead_mask=torch.zeros(3, dtype=torch.bool)))
    assert parts.terms["aux"].item() == 0.0
    # Inference: the same selection, per token.
    z = sae.encode_normalized(x)
    assert z.tolist() == [[1.0, 0.0, 0.0], [0.0, 3.0, 0.0]]


@pytest.mark.parametrize("cfg", [SaeConfig.of("topk", 8, 32, k=4, aux_coeff=0.1),
                                 SaeConfig.of("batchtopk", 8, 32, k=4, aux_coeff=0.1),
                                 SaeConfig.of("matryoshka", 8, 32, k=4, aux_coeff=0.1, prefixes=(8, 32))],
                         ids=lambda c: c.variant)
def test_sparse_and_dense_training_paths_agree_in_value_and_gradient(cfg):
    """Sparse decoding (embedding_bag) and the sparse encoder backward give the dense path's
    loss and gradients, AuxK included."""
    grads = []
    for sparse in (False, True):
        sae = build_sae(cfg)
        sae.reset_parameters(torch.Generator().manual_seed(1))
        sae.sparse_decode = sae.sparse_encode = sparse
        x = torch.randn(16, 8, generator=torch.Generator().manual_seed(2))
        dead = torch.arange(32) % 3 == 0
        loss = sae.loss(x, LossContext(dead_mask=dead)).loss
        loss.backward()
        grads.append((loss.detach(), {n: p.grad.clone() for n, p in sae.named_parameters()}))
    torch.testing.assert_close(grads[0][0], grads[1][0])
    for name, g in grads[0][1].items():
        torch.testing.assert_close(g, grads[1][1][name], atol=1e-5, rtol=1e-5, msg=name)


def batch_inputs() -> torch.Tensor:
    # Row 1: x - b_dec = (2, 1) -> pre = (2, -1, 1.25); Row 2: x - b_dec = (0, 0.5) -> pre = (0, 0, 0.75)
    return torch.tensor([[2.5, 0.5], [0.5, 0.0]])


def test_batchtopk_keeps_k_per_token_on_average_and_learns_its_threshold():
    sae = hand_sae("batchtopk", k=1)
    sae.sparse_decode = sae.sparse_encode = True
    x = batch_inputs()
    # The 2 largest of the batch are both row 1's: 2 (latent 0) and 1.25 (latent 2); row 2 gets none.
    #   row 1: x_hat = 2 (1, 0) + 1.25 (0.6, 0.8) + b_dec = (3.25, 0.5); err (0.75, 0) -> 0.5625
    #   row 2: x_hat = b_dec = (0.5, -0.5); err (0, -0.5) -> 0.25
    parts = sae.loss(x)
    assert parts.recon.item() == pytest.approx((0.5625 + 0.25) / 2)
    assert parts.loss.item() == pytest.approx((0.5625 + 0.25) / 2)
    assert parts.fires.tolist() == [1, 0, 1] and parts.l0.item() == 1.0
    assert parts.min_active.item() == 1.25
    sae.update_stats(parts)
    assert float(sae.threshold) == 1.25  # the first batch sets it
    sae.update_stats(parts._replace(min_active=torch.tensor(0.5)))
    assert float(sae.threshold) == pytest.approx(0.99 * 1.25 + 0.01 * 0.5)
    # Inference keeps what exceeds the threshold, whatever else is in the batch.
    sae.eval()
    with torch.no_grad():
        sae.threshold.fill_(1.0)
    z = sae.encode_normalized(x)
    assert z.tolist() == [[2.0, 0.0, 1.25], [0.0, 0.0, 0.0]]
    torch.testing.assert_close(sae.encode_normalized(x[1:]), z[1:])


def test_matryoshka_loss_is_the_mean_of_its_prefix_losses():
    sae = hand_sae("matryoshka", k=1, prefixes=(1, 3))
    x = batch_inputs()
    # Codes as BatchTopK: row 1 (2, 0, 1.25), row 2 none.
    # Prefix {0}: row 1 x_hat = 2 (1, 0) + b_dec = (2.5, -0.5); err (0, -1) -> 1; row 2 -> 0.25
    # Prefix {0, 1, 2}: 0.5625 and 0.25, as for BatchTopK.
    parts = sae.loss(x)
    full, first = (0.5625 + 0.25) / 2, (1 + 0.25) / 2
    assert parts.recon.item() == pytest.approx(full)
    assert parts.loss.item() == pytest.approx((first + full) / 2)


def test_jumprelu_loss_and_its_straight_through_threshold_gradient():
    sae = hand_sae("jumprelu", l0_coeff=0.1, bandwidth=1.0)
    with torch.no_grad():
        sae.log_threshold.copy_(torch.tensor([0.5, 0.5, 1.0]).log())
    x = batch_inputs()
    # pre row 1 (2, -1, 1.25) vs thresholds (0.5, 0.5, 1): z = (2, 0, 1.25); row 2 (0, 0, 0.75): z = 0
    # recon as BatchTopK above; L0 = (2 + 0) / 2 = 1
    parts = sae.loss(x)
    recon = (0.5625 + 0.25) / 2
    assert parts.recon.item() == pytest.approx(recon)
    assert parts.terms["l0"].item() == pytest.approx(1.0)
    assert parts.loss.item() == pytest.approx(recon + 0.1)
    parts.loss.backward()
    # Only latent 2 has pre-activations within bandwidth / 2 of its threshold (1.25 and 0.75).
    # L0 term: 0.1 * mean over rows of -(1 / eps) * 1 = -0.1.
    # Recon term: mean over rows of dL/dz_2 * -(t / eps), dL/dz_2 = 2 (x_hat - x) . W_dec[2]:
    #   row 1: 2 (0.75, 0) . (0.6, 0.8) = 0.9; row 2: 2 (0, -0.5) . (0.6, 0.8) = -0.8 -> -(0.9 - 0.8) / 2
    # d/d log t = t * d/dt with t = 1.
    torch.testing.assert_close(sae.log_threshold.grad, torch.tensor([0.0, 0.0, -0.05 - 0.1]))
    sae.eval()
    assert sae.encode_normalized(x).tolist() == [[2.0, 0.0, 1.25], [0.0, 0.0, 0.0]]


@pytest.mark.parametrize("cfg", [
    SaeConfig.of("relu", 4, 8),
    SaeConfig.of("topk", 4, 8, k=2),
    SaeConfig.of("batchtopk", 4, 8, k=2),
    SaeConfig.of("matryoshka", 4, 8, k=2, prefixes=(2, 4, 8)),
    SaeConfig.of("jumprelu", 4, 8),
], ids=lambda c: c.variant)
def test_every_family_loads_back_as_saved(tmp_path, cfg):
    store = LocalStore(tmp_path)
    sae = build_sae(cfg)
    with torch.no_grad():
        sae.norm_mean.copy_(torch.arange(4.0))
        sae.norm_scale.fill_(math.pi)
        if isinstance(sae, BatchTopKSae):
            sae.threshold.fill_(0.375)
        if isinstance(sae, JumpReluSae):
            sae.log_threshold.normal_()
    save_sae(store, sae, SaeRecord(sae_id="abc", config=sae.cfg, activation_set_id="s", layer=3, tokens=["patches"]))
    back, record = load_sae_from(store, "abc")
    assert type(back) is type(sae) and back.cfg == cfg and record.config == cfg
    for name, value in sae.state_dict().items():
        torch.testing.assert_close(back.state_dict()[name], value)
    if isinstance(sae, BatchTopKSae):
        assert record.extra["threshold"] == 0.375
    if isinstance(sae, MatryoshkaSae):
        assert record.config.hyper.prefixes == (2, 4, 8)
    # One line from a URI, raw activations in, normalisation applied.
    x = torch.randn(5, 4)
    one_line = load_sae(f"{tmp_path}/saes/abc")
    sae.eval()
    torch.testing.assert_close(one_line.encode(x), sae.encode(x))


def test_topk_inference_keeps_exactly_k():
    sae = build_sae(SaeConfig.of("topk", 16, 64, k=5)).eval()
    z = sae.encode(torch.randn(10, 16) * 10)
    assert ((z > 0).sum(dim=1) <= 5).all() and isinstance(sae, TopKSae)


@pytest.mark.parametrize("cfg", [
    SaeConfig.of("relu", 8, 32), SaeConfig.of("topk", 8, 32, k=4), SaeConfig.of("batchtopk", 8, 32, k=4),
    SaeConfig.of("matryoshka", 8, 32, k=4, prefixes=(8, 32)), SaeConfig.of("jumprelu", 8, 32),
], ids=lambda c: c.variant)
def test_one_latent_alone_is_what_the_full_encode_gives(cfg):
    sae = build_sae(cfg)
    sae.reset_parameters(torch.Generator().manual_seed(3))
    with torch.no_grad():
        sae.b_enc.normal_(generator=torch.Generator().manual_seed(4))
        if isinstance(sae, BatchTopKSae):
            sae.threshold.fill_(0.5)
    sae.eval()
    x = torch.randn(3, 5, 8, generator=torch.Generator().manual_seed(5))
    full = sae.encode(x)
    assert (full > 0).any()
    for latent in range(32):
        torch.testing.assert_close(sae.encode_latent(x, latent), full[..., latent])


@pytest.mark.parametrize("cfg", [SaeConfig.of("relu", 8, 32), SaeConfig.of("topk", 8, 32, k=4),
                                 SaeConfig.of("batchtopk", 8, 32, k=4), SaeConfig.of("jumprelu", 8, 32),
                                 SaeConfig.of("matryoshka", 8, 32, k=4, prefixes=(8, 32))],
                         ids=lambda c: c.variant)
def test_sparse_codes_are_the_dense_codes_and_decode_alike(cfg):
    """The triples a pass over many tokens keeps hold exactly the dense codes' nonzero values, and
    their gather decode is the dense decode (the trainer's final metrics rely on both)."""
    sae = build_sae(cfg)
    sae.reset_parameters(torch.Generator().manual_seed(3))
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.5, generator=torch.Generator().manual_seed(4))
        sae.b_dec.normal_(0, 0.5, generator=torch.Generator().manual_seed(5))
    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        z = sae.encode_normalized(x)
        codes = sae.encode_sparse_normalized(x)
        rebuilt = torch.zeros_like(z).index_put_((codes.rows, codes.cols), codes.vals, accumulate=True)
        torch.testing.assert_close(rebuilt, z)
        assert bool((codes.rows[1:] >= codes.rows[:-1]).all()), "rows must ascend"
        assert (z > 0).any(), "the test needs some active latents"
        torch.testing.assert_close(sae.decode_sparse_normalized(codes, len(x)), sae.decode_normalized(z),
                                   atol=1e-5, rtol=1e-5)
