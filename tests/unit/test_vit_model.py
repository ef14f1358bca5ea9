"""Encoder/head structure and Opacus per-sample gradients on the tiny model."""

from __future__ import annotations

import pytest
import torch
from opacus import GradSampleModule, PrivacyEngine
from torch.utils.data import DataLoader, TensorDataset

from ctfed.common.config import ModelConfig
from ctfed.common.model import (
    DINOHead,
    SSLModel,
    ViTEncoder,
    build_teacher,
    count_parameters,
    register_dp_grad_samplers,
)

CFG = ModelConfig()
N = CFG.tokens_per_side**3


def _volumes(batch: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, CFG.in_channels, CFG.image_size, CFG.image_size, CFG.image_size,
                      generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def model() -> SSLModel:
    torch.manual_seed(0)
    return SSLModel(CFG).eval()


def test_encoder_returns_cls_plus_patch_tokens(model: SSLModel) -> None:
    x = _volumes(2)
    tokens = model.encoder(x)
    assert tokens.shape == (2, 1 + N, CFG.hidden_size)
    assert torch.equal(model.encoder.cls_features(x), tokens[:, 0])
    assert model(x).shape == (2, CFG.head_prototypes)


def test_wrong_input_size_is_a_clear_error(model: SSLModel) -> None:
    with pytest.raises(ValueError, match="image_size"):
        model.encoder(torch.rand(1, CFG.in_channels, 48, 48, 48))


def test_mask_replaces_only_masked_tokens_before_position_embedding(model: SSLModel) -> None:
    encoder = model.encoder
    x = _volumes(2)
    mask = torch.zeros(2, N, dtype=torch.bool)
    mask[0, :5] = True
    with torch.no_grad():
        encoder.mask_token.token.normal_()
        plain, masked = encoder(x), encoder(x, mask)
        # Sample 1 has no masked patch: its whole output is untouched.
        assert torch.allclose(plain[1], masked[1])
        assert not torch.allclose(plain[0], masked[0])
        # Two masked patches differ only by position: the mask token goes in before positions.
        embed = encoder.patch_embedding
        patches = embed.patch_embeddings(x).flatten(2).transpose(1, 2)
        swapped = encoder.mask_token(patches, mask) + embed.position_embeddings
        assert torch.allclose(swapped[0, 0] - swapped[0, 1],
                              embed.position_embeddings[0, 0] - embed.position_embeddings[0, 1], atol=1e-6)
        assert torch.equal(swapped[1], patches[1] + embed.position_embeddings[0])
    with pytest.raises(ValueError, match="mask"):
        encoder(x, mask.float())


def test_encoder_state_has_no_head_and_fixed_positions(model: SSLModel) -> None:
    keys = model.encoder.state_dict().keys()
    assert not any(k.startswith("head") or "last_layer" in k for k in keys)
    assert "patch_embedding.position_embeddings" in keys
    assert "cls_token.token" in keys and "mask_token.token" in keys
    assert not model.encoder.patch_embedding.position_embeddings.requires_grad
    assert set(model.state_dict()) == {f"encoder.{k}" for k in keys} | {f"head.{k}" for k in model.head.state_dict()}


def test_head_last_layer_is_weight_normalised() -> None:
    head = DINOHead(8, 16, 4, 10)
    with torch.no_grad():
        head.last_layer.weight.mul_(5.0)
    z = torch.randn(3, 4)
    # Scaling the raw weight must not change the output: magnitude frozen at 1.
    unit = torch.nn.functional.normalize(z, dim=-1) @ torch.nn.functional.normalize(head.last_layer.weight, dim=1).T
    assert torch.allclose(head.last_layer(torch.nn.functional.normalize(z, dim=-1)), unit, atol=1e-6)


def test_teacher_is_frozen_copy(model: SSLModel) -> None:
    teacher = build_teacher(model)
    assert all(not p.requires_grad for p in teacher.parameters())
    assert any(p.requires_grad for p in model.parameters())
    for (name, s), (_, t) in zip(model.state_dict().items(), teacher.state_dict().items()):
        assert torch.equal(s, t), name
        assert s.data_ptr() != t.data_ptr()


def test_mae_decoder_predicts_every_patch_and_has_no_teacher() -> None:
    torch.manual_seed(0)
    student = SSLModel(CFG, mae_decoder=True)
    assert student.decoder is not None
    tokens = student.encoder(_volumes(2))
    prediction = student.decoder(tokens[:, 1:])
    assert prediction.shape == (2, N, CFG.in_channels * CFG.patch_size**3)
    # The fixed positions are not weights: nothing to send or restore.
    assert not any("position" in key for key in student.decoder.state_dict())
    teacher = build_teacher(student)
    assert teacher.decoder is None and student.decoder is not None
    assert set(teacher.state_dict()) == {k for k in student.state_dict() if not k.startswith("decoder.")}


def test_opacus_per_sample_gradients_match_per_sample_backward() -> None:
    torch.manual_seed(0)
    model = SSLModel(CFG)
    x = _volumes(3)
    mask = torch.rand(3, N, generator=torch.Generator().manual_seed(1)) < 0.3
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}

    register_dp_grad_samplers()
    gsm = GradSampleModule(model, loss_reduction="sum")
    gsm(x, mask).pow(2).sum().backward()
    missing = [n for n, p in trainable.items() if getattr(p, "grad_sample", None) is None]
    assert not missing, f"Opacus computed no per-sample gradient for {missing}"
    per_sample = {n: p.grad_sample.detach().clone() for n, p in trainable.items()}
    gsm._close()

    for i in range(3):
        model.zero_grad(set_to_none=True)
        model(x[i : i + 1], mask[i : i + 1]).pow(2).sum().backward()
        for name, param in trainable.items():
            # float32 sums in another order: an element's error scales with the tensor's largest
            # value (about 1e-6 of it here), not with the element itself.
            scale = max(1.0, float(param.grad.abs().max()))
            assert torch.allclose(per_sample[name][i], param.grad, rtol=1e-4, atol=1e-5 * scale), name


def test_privacy_engine_makes_tiny_model_private_and_steps() -> None:
    torch.manual_seed(0)
    model = SSLModel(CFG)
    model.encoder.mask_token.requires_grad_(False)  # unused without masking, as in LocalTrainer
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    loader = DataLoader(TensorDataset(_volumes(4)), batch_size=2)
    register_dp_grad_samplers()
    private_model, optimizer, loader = PrivacyEngine().make_private(
        module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=0.5,
        max_grad_norm=1.0, poisson_sampling=False,
    )
    (x,) = next(iter(loader))
    optimizer.zero_grad()
    private_model(x).logsumexp(dim=-1).mean().backward()
    optimizer.step()
    changed = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert set(changed) == set(before)


def test_vit_b_config_constructs_at_about_86m_parameters() -> None:
    cfg = ModelConfig(name="vit_b", image_size=96, patch_size=12, hidden_size=768, num_layers=12,
                      num_heads=12, mlp_dim=3072, head_hidden=2048, head_bottleneck=256, head_prototypes=65536)
    encoder = ViTEncoder(cfg)
    assert encoder.num_patches == 512
    # 85M in the 12 blocks (as ViT-B/16) + 4M for the 3x12^3 conv patch embedding.
    assert 85e6 < count_parameters(encoder) < 90e6


def test_forward_with_patches_shares_the_head_between_cls_and_selected_tokens(model: SSLModel) -> None:
    x = _volumes(3)
    mask = torch.zeros(3, N, dtype=torch.bool)
    mask[0, 2:6] = True
    select = mask[:2].clone()
    select[1, 0] = True  # selecting an unmasked token is allowed (teacher side)
    with torch.no_grad():
        cls_logits, patch_logits = model.forward_with_patches(x, mask, select)
        tokens = model.encoder(x, mask)
        assert torch.allclose(cls_logits, model(x, mask), atol=1e-6)
        assert torch.allclose(patch_logits, model.head(tokens[:2, 1:][select]), atol=1e-6)
    assert patch_logits.shape == (int(select.sum()), CFG.head_prototypes)
    with pytest.raises(ValueError, match="select"):
        model.forward_with_patches(x, mask, torch.zeros(4, N, dtype=torch.bool))


def test_dropping_patches_equals_attending_to_the_visible_ones_only() -> None:
    """MAE's token dropping: with every patch kept the encoder is unchanged; with some
    dropped, the decoder puts its own token where they were."""
    from ctfed.common.masking import random_keep

    torch.manual_seed(0)
    student = SSLModel(CFG, mae_decoder=True).eval()
    x = _volumes(2)
    everything = torch.arange(N).expand(2, -1)
    assert torch.allclose(student.encoder(x, None, everything), student.encoder(x), atol=1e-5)
    assert student.decoder is not None
    tokens = student.encoder(x)[:, 1:]
    assert torch.allclose(student.decoder(tokens, everything), student.decoder(tokens), atol=1e-5)
    keep, _ = random_keep(2, N, 0.75, torch.Generator().manual_seed(1))
    visible = student.encoder(x, None, keep)
    assert visible.shape == (2, 1 + keep.shape[1], CFG.hidden_size)
    assert student.decoder(visible[:, 1:], keep).shape == (2, N, CFG.in_channels * CFG.patch_size**3)


def _content_to_position(encoder: ViTEncoder, x: torch.Tensor) -> float:
    """Across-scan RMS of the patch content over the RMS of the position table."""
    with torch.no_grad():
        embed = encoder.patch_embedding
        content = embed.patch_embeddings((x - encoder.input_mean) / encoder.input_std).flatten(2)
        return float(content.std(dim=0).pow(2).mean().sqrt() / embed.position_embeddings.pow(2).mean().sqrt())


def test_standardised_inputs_make_content_comparable_to_position() -> None:
    """At initialisation the patch content must not drown in the fixed sin-cos table, or every
    scan gets nearly the same features (the defect: [0, 1] inputs and torch's conv init)."""
    from ctfed.common.reference import reference_heads

    heads = reference_heads(8, CFG.image_size, seed=3)
    torch.manual_seed(0)
    encoder = ViTEncoder(CFG)
    assert _content_to_position(encoder, heads) > 0.4
    # The inputs the encoder sees are standardised by the model's own statistics ...
    shifted = ViTEncoder(ModelConfig(input_mean=[0.0] * 3, input_std=[1.0] * 3))
    shifted.load_state_dict(encoder.state_dict())
    std = torch.tensor(CFG.input_std).view(1, 3, 1, 1, 1)
    mean = torch.tensor(CFG.input_mean).view(1, 3, 1, 1, 1)
    assert torch.allclose(encoder(heads), shifted((heads - mean) / std), atol=1e-5)
    # ... and without them (and with torch's default conv init) content is a tenth of position.
    old = ViTEncoder(ModelConfig(input_mean=[0.0] * 3, input_std=[1.0] * 3))
    torch.nn.Conv3d.reset_parameters(old.patch_embedding.patch_embeddings)
    assert _content_to_position(old, heads) < 0.15
    with pytest.raises(Exception, match="input_mean"):
        ModelConfig(in_channels=1)


def test_checkpoint_written_before_standardisation_loads_unstandardised(tmp_path) -> None:  # noqa: ANN001
    import json

    from ctfed.common.checkpoint import load_checkpoint, save_checkpoint

    encoder = ViTEncoder(CFG)
    weights = save_checkpoint(tmp_path / "old", encoder.state_dict(), CFG, kind="global-encoder")
    card_path = weights.with_suffix(".json")
    card = json.loads(card_path.read_text())
    del card["model"]["input_mean"], card["model"]["input_std"]
    card_path.write_text(json.dumps(card))
    _, model, _ = load_checkpoint(weights)
    assert model.input_mean == [0.0] * 3 and model.input_std == [1.0] * 3
