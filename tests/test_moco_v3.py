"""MoCo v3 in one process: which parts train, the momentum update, the frozen patch projection, ViT
backbones, the weight-decay groups and the config's refusals."""

import copy

import pytest
import torch

from mocoray.config.common import ConfigError
from mocoray.config.pretrain import load_config
from mocoray.core.backbones import build_backbone
from mocoray.core.moco import train_step
from mocoray.core.moco_v3 import build_moco_v3, contrastive_loss, weight_decay_groups
from mocoray.core.vit import ViTBackbone, freeze_patch_embed
from mocoray.detection.model import build_detector


def small_v3(momentum: float = 0.9):
    torch.manual_seed(0)
    backbone = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                                   torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    return build_moco_v3(backbone, 8, dim=4, hidden_dim=16, proj_layers=2, momentum=momentum, temperature=0.2)


def test_gradients_reach_query_encoder_and_predictor_only():
    model = small_v3()
    out = model(torch.randn(6, 3, 8, 8), torch.randn(6, 3, 8, 8))
    out.loss.backward()
    for name, p in [*model.encoder_q.named_parameters(), *model.predictor.named_parameters()]:
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    for name, p in model.encoder_k.named_parameters():
        assert not p.requires_grad and p.grad is None, name
    # the key side is backbone + projection MLP only: no predictor, same structure as encoder_q
    assert not any("predictor" in n for n, _ in model.encoder_k.named_modules())
    assert [n for n, _ in model.encoder_k.named_parameters()] == [n for n, _ in model.encoder_q.named_parameters()]
    assert 0.0 <= float(out.accuracy) <= 1.0


def test_key_encoder_follows_the_momentum_update():
    model = small_v3(momentum=0.75)
    with torch.no_grad():  # make the two encoders differ so the update is visible
        for p in model.encoder_q.parameters():
            p.add_(0.1)
    q_before = [p.detach().clone() for p in model.encoder_q.parameters()]
    k_before = [p.detach().clone() for p in model.encoder_k.parameters()]
    opt = torch.optim.SGD(weight_decay_groups(model, 1e-4), lr=0.1)
    train_step(model, torch.randn(6, 3, 8, 8), torch.randn(6, 3, 8, 8), opt)
    # the update runs in the forward, before the optimiser step: theta_k = m theta_k + (1 - m) theta_q(before)
    for k_old, q_old, k_new in zip(k_before, q_before, model.encoder_k.parameters(), strict=True):
        torch.testing.assert_close(k_new, 0.75 * k_old + 0.25 * q_old)
    assert any(not torch.equal(a, b) for a, b in zip(q_before, model.encoder_q.parameters(), strict=True))


def test_vit_forward_on_32px_images_cls_and_mean_pooling():
    backbone, dim = build_backbone("vit_tiny_patch4_32")
    x = torch.randn(3, 3, 32, 32)
    cls = backbone(x)
    assert cls.shape == (3, dim) and torch.isfinite(cls).all()
    backbone.set_pool("mean")
    assert backbone(x).shape == (3, dim) and not torch.allclose(backbone(x), cls)
    with pytest.raises(ValueError, match="'max' is not one of cls, mean"):
        backbone.set_pool("max")


def test_frozen_patch_projection_does_not_change_in_training():
    torch.manual_seed(0)
    backbone = ViTBackbone("vit_tiny_patch4_32")
    freeze_patch_embed(backbone)
    model = build_moco_v3(backbone, backbone.out_dim, dim=16, hidden_dim=32, proj_layers=3, momentum=0.99,
                          temperature=0.2)
    patch = copy.deepcopy(backbone.vit.conv_proj.state_dict())
    blocks = backbone.vit.encoder.layers[0].mlp[0].weight.detach().clone()
    opt = torch.optim.AdamW(weight_decay_groups(model, 0.1), lr=1e-3)  # weight decay would move it too
    for _ in range(2):
        train_step(model, torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32), opt)
    for name, value in backbone.vit.conv_proj.state_dict().items():
        assert torch.equal(value, patch[name]), name
    assert not torch.equal(blocks, backbone.vit.encoder.layers[0].mlp[0].weight)  # the rest trains
    with pytest.raises(ValueError, match="needs a ViT"):
        freeze_patch_embed(build_backbone("small_resnet_slim")[0])


def test_bf16_autocast_steps_of_a_vit_keep_fp32_weights_and_loss_and_fit_a_fixed_batch():
    """run.amp: bf16 under MoCo v3, on the CPU's autocast (the GPU figures are the GPU check's): the weights and
    the heads' BN statistics stay float32, the logits are computed in float32, and the loss falls on one batch."""
    torch.manual_seed(0)
    backbone = ViTBackbone("vit_tiny_patch4_32")
    freeze_patch_embed(backbone)
    model = build_moco_v3(backbone, backbone.out_dim, dim=16, hidden_dim=32, proj_layers=3, momentum=0.99,
                          temperature=0.2)
    opt = torch.optim.AdamW(weight_decay_groups(model, 0.1), lr=1e-3)
    x1, x2 = torch.randn(8, 3, 32, 32), torch.randn(8, 3, 32, 32)
    losses = [train_step(model, x1, x2, opt, None, torch.bfloat16).loss for _ in range(8)]
    assert all(torch.isfinite(torch.tensor(losses)))
    # at chance each direction is 2 tau ln 8 (8 keys): 1.66 for the pair; measured 1.63 -> 0.41 in 8 steps
    assert losses[0] > 1.4 and losses[-1] < 0.5 * losses[0], losses
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(b.dtype == torch.float32 for n, b in model.named_buffers() if "running" in n)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        q = model.predictor(model.encoder_q(x1))
        k = model.encoder_k(x2)
        loss, _ = contrastive_loss(q, k, 0.2, 0)
    assert q.dtype == torch.bfloat16 and loss.dtype == torch.float32  # the logits left autocast


def test_weight_decay_skips_biases_and_norm_parameters():
    model = small_v3()
    decay, no_decay = weight_decay_groups(model, 0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim > 1 for p in decay["params"]) and all(p.ndim <= 1 for p in no_decay["params"])
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(decay["params"]) + len(no_decay["params"]) == len(trainable)


@pytest.mark.parametrize(("overrides", "message"), [
    (["moco.version=3", "moco.queue_size=4096"], "v3 has no queue and its own BN MLP heads: remove moco.queue_size"),
    (["moco.version=3", "moco.bn_mode=split"], "remove moco.bn_mode"),
    (["moco.version=v2", "moco.hidden_dim=512"], "moco.hidden_dim: v3 only"),
    (["moco.backbone_bn=local"], r"moco.backbone_bn: v3 only; moco.version is 'v2' \(its backbone's BN is moco.bn_mode"),
    (["moco.version=3", "moco.backbone_bn=sync"], "moco.backbone_bn"),
    (["model.freeze_patch_embed=true"], "model.freeze_patch_embed=true needs a ViT model.arch"),
    (["model.arch=vit_small_patch16_224", "data.image_size=32"], "takes 224 px images"),
    (["moco.version=4"], "moco.version"),
    (["optim.optimizer=adamw"], "optim.optimizer='adamw' is for moco.version v3"),
    (["moco.version=3", "run.compile=true"], "run.compile=true is for moco.version v1/v2"),
])
def test_config_refuses_what_v3_or_a_vit_cannot_take(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_config_accepts_version_3_as_a_number():
    cfg = load_config(None, ["moco.version=3", "model.arch=vit_tiny_patch4_32", "model.freeze_patch_embed=true",
                             "optim.optimizer=adamw"])
    assert cfg.moco.version == "v3" and cfg.model.freeze_patch_embed


def test_detection_refuses_a_vit_encoder():
    with pytest.raises(ValueError, match="'vit_tiny_patch4_32' is a ViT: detection transfer takes ResNet"):
        build_detector("vit_tiny_patch4_32", num_classes=2)


def test_lars_scales_matrix_steps_by_the_trust_ratio_and_leaves_biases_plain():
    from mocoray.core.lars import LARS

    w = torch.nn.Parameter(torch.tensor([[3.0, 4.0]]))  # norm 5
    b = torch.nn.Parameter(torch.tensor([1.0]))
    opt = LARS([w, b], lr=0.5, weight_decay=0.1, momentum=0.9, trust_coefficient=0.01)
    w.grad, b.grad = torch.tensor([[0.7, 0.6]]), torch.tensor([2.0])
    opt.step()
    update = torch.tensor([[0.7, 0.6]]) + 0.1 * torch.tensor([[3.0, 4.0]])  # [[1.0, 1.0]], norm sqrt(2)
    trust = 0.01 * 5.0 / 2.0 ** 0.5
    torch.testing.assert_close(w.detach(), torch.tensor([[3.0, 4.0]]) - 0.5 * trust * update)
    torch.testing.assert_close(b.detach(), torch.tensor([0.0]))  # 1 - 0.5 * 2: no decay, no trust ratio


def test_linear_protocol_takes_a_vit_backbone_with_the_pooling_named_in_config(tmp_path):
    from mocoray.encoders import EncoderSource
    from mocoray.jobs.linear.features import build_frozen_backbone

    torch.manual_seed(0)
    trained = ViTBackbone("vit_tiny_patch4_32")
    torch.save(trained.state_dict(), tmp_path / "backbone.pt")
    source = EncoderSource(str(tmp_path / "backbone.pt"), "vit_tiny_patch4_32", False)
    x = torch.randn(2, 3, 32, 32)
    trained.eval()
    for pool in ("cls", "mean"):
        backbone, feat_dim = build_frozen_backbone(source, vit_pool=pool)
        trained.set_pool(pool)
        assert feat_dim == 128 and not any(p.requires_grad for p in backbone.parameters())
        torch.testing.assert_close(backbone(x), trained(x))
    with pytest.raises(ValueError, match="encoder.vit_pool='mean' is for ViT encoders"):
        torch.save(build_backbone("small_resnet_slim")[0].state_dict(), tmp_path / "resnet.pt")
        build_frozen_backbone(EncoderSource(str(tmp_path / "resnet.pt"), "small_resnet_slim", False), vit_pool="mean")
