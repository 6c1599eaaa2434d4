import dataclasses

import pytest
import torch

from mocoray.core.augment import BatchAugment, moco_spec, two_view_transform
from mocoray.core.backbones import SmallResNet, build_backbone, count_macs
from mocoray.core.moco import Encoder, MoCo, NonFiniteLossError, train_step
from mocoray.data.digits import scattered_digits


def _moco(bn_mode: str = "split", K: int = 32, m: float = 0.9) -> MoCo:
    torch.manual_seed(0)
    bb, d = build_backbone("small_resnet")
    return MoCo(Encoder(bb, d, 16, mlp=True), queue_size=K, momentum=m, temperature=0.2, bn_mode=bn_mode,
                num_splits=2)


def test_step_updates_query_encoder_moves_key_encoder_and_enqueues_after_the_step():
    m = _moco()
    opt = torch.optim.SGD(m.encoder_q.parameters(), lr=0.1, momentum=0.9)
    q0 = [p.detach().clone() for p in m.encoder_q.parameters()]
    k0 = [p.detach().clone() for p in m.encoder_k.parameters()]
    queue0 = m.queue.keys.clone()
    x = torch.randn(8, 3, 16, 16)
    res = train_step(m, x, x.flip(-1), opt)
    assert 0.0 <= res.accuracy <= 1.0 and res.loss > 0
    assert int(m.queue.ptr) == 8
    assert not torch.equal(m.queue.keys[:8], queue0[:8]) and torch.equal(m.queue.keys[8:], queue0[8:])
    assert torch.allclose(m.queue.keys[:8].norm(dim=1), torch.ones(8), atol=1e-5)
    assert any(not torch.equal(a, b) for a, b in zip(m.encoder_q.parameters(), q0, strict=True))
    # the key encoder moved by (1-m) towards the query encoder *before* this step's update
    for pk, pk0, pq0 in zip(m.encoder_k.parameters(), k0, q0, strict=True):
        assert torch.allclose(pk, 0.9 * pk0 + 0.1 * pq0, atol=1e-6)


def test_nan_loss_raises_before_touching_weights_or_queue():
    m = _moco()
    opt = torch.optim.SGD(m.encoder_q.parameters(), lr=0.1)
    before = {k: v.clone() for k, v in m.encoder_q.state_dict().items()}
    x = torch.randn(8, 3, 16, 16)
    with pytest.raises(NonFiniteLossError, match="non-finite"):
        train_step(m, x * float("nan"), x, opt)
    after = m.encoder_q.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if "running" not in k and "num_batches" not in k)
    assert int(m.queue.ptr) == 0


def test_a_few_steps_make_views_of_the_same_image_agree_more():
    # The training loss itself can rise while the queue fills with real keys, so measure a fixed
    # probe instead: instance discrimination of 32 fixed view pairs (in-batch negatives).

    data = scattered_digits()[0].subset(range(256))
    m = _moco(K=32, m=0.99)  # K well below the number of images, else an image's own old key is a negative
    opt = torch.optim.SGD(m.encoder_q.parameters(), lr=0.05, momentum=0.9)
    aug = BatchAugment(moco_spec("v2", 32, crop_scale=(0.4, 1.0)))
    gen = torch.Generator().manual_seed(0)
    probe_q, probe_k = aug.two_views(data.images[:32], gen)

    @torch.no_grad()
    def probe() -> float:
        m.eval()
        f = lambda x: torch.nn.functional.normalize(m.encoder_q(x), dim=1)  # noqa: E731
        logits = f(probe_q) @ f(probe_k).t() / 0.2
        loss = torch.nn.functional.cross_entropy(logits, torch.arange(32)).item()
        m.train()
        return loss

    before = probe()
    for _ in range(30):
        q, k = aug.two_views(data.images[torch.randperm(256, generator=gen)[:32]], gen)
        train_step(m, q, k, opt)
    assert probe() < before - 0.2


def test_batch_augment_shapes_statistics_and_determinism():
    x = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8)
    aug = BatchAugment(moco_spec("v2", 24, blur=True))
    a = aug(x, torch.Generator().manual_seed(1))
    b = aug(x, torch.Generator().manual_seed(1))
    c = aug(x, torch.Generator().manual_seed(2))
    assert a.shape == (6, 3, 24, 24) and a.dtype == torch.float32
    assert torch.equal(a, b) and not torch.equal(a, c)
    v1, v2 = aug.two_views(x)
    assert not torch.equal(v1, v2)


def test_batchnorm_head_trains_under_split_bn():
    torch.manual_seed(0)
    bb, d = build_backbone("small_resnet_slim")
    m = MoCo(Encoder(bb, d, 16, mlp=True, head_bn=True), queue_size=32, momentum=0.9, temperature=0.2,
             bn_mode="split", num_splits=2)
    head_bn = [mod for mod in m.encoder_q.head.modules() if isinstance(mod, torch.nn.BatchNorm1d)]
    assert len(head_bn) == 1 and type(head_bn[0]) is torch.nn.BatchNorm1d  # whole-batch statistics, not split
    opt = torch.optim.SGD(m.encoder_q.parameters(), lr=0.1, momentum=0.9)
    x = torch.rand(8, 3, 32, 32)
    result = train_step(m, x, x.flip(0), opt)
    assert 0 < result.loss < 10 and int(m.queue.ptr) == 8
    assert m.encoder_q.head[1].running_mean.abs().sum() > 0 and m.encoder_k.head[1].running_mean.abs().sum() > 0
    with pytest.raises(ValueError, match="MLP head"):
        Encoder(bb, d, 16, mlp=False, head_bn=True)


def test_flip_probability_and_colour_jitter_follow_the_recipe():
    # Digits and text change meaning when mirrored, so recipes for them set data.flip_p=0.
    x = torch.zeros(200, 3, 32, 32)
    x[..., :16] = 1.0  # bright left half: a mirrored view is bright on the right

    def mirrored_fraction(flip_p: float) -> float:
        spec = dataclasses.replace(moco_spec("v2", 32, crop_scale=(0.9, 1.0)), flip_p=flip_p)
        v = BatchAugment(spec).crop_flip(x, torch.Generator().manual_seed(0))
        return (v[..., -8:].mean(dim=(1, 2, 3)) > v[..., :8].mean(dim=(1, 2, 3))).float().mean().item()

    assert mirrored_fraction(0.0) == 0.0 and mirrored_fraction(1.0) == 1.0
    assert 0.35 < mirrored_fraction(0.5) < 0.65
    from mocoray.config import load_config
    from mocoray.jobs.pretrain.views import augment_spec

    assert augment_spec(load_config(None, ["data.flip_p=0"])).flip_p == 0.0
    assert augment_spec(load_config(None, [])).flip_p == 0.5  # the paper's
    assert augment_spec(load_config(None, [])).jitter == (0.4, 0.4, 0.4, 0.1)
    assert augment_spec(load_config(None, ["data.color_jitter=0.2"])).jitter == (0.2, 0.2, 0.2, 0.1)
    assert augment_spec(load_config(None, ["data.color_jitter=0"])).jitter == (0.0, 0.0, 0.0, 0.0)


def test_paper_recipes_and_torchvision_path():
    v1, v2 = moco_spec("v1", 224), moco_spec("v2", 224)
    assert v1.jitter == (0.4, 0.4, 0.4, 0.4) and v1.jitter_p == 1.0 and v1.blur_p == 0.0
    assert v2.jitter == (0.4, 0.4, 0.4, 0.1) and v2.jitter_p == 0.8 and v2.grayscale_p == 0.2 and v2.blur_p == 0.5
    assert moco_spec("v2", 32).blur_p == 0.0  # 32 px variant
    from PIL import Image

    views = two_view_transform(moco_spec("v2", 32))(Image.new("RGB", (40, 50), (10, 200, 30)))
    assert views[0].shape == views[1].shape == (3, 32, 32)
    assert moco_spec("v3", 224) == v2  # v3 takes v2's views (BYOL's asymmetric ones are not built)
    with pytest.raises(ValueError, match="'v4' is not one of v1, v2, v3"):
        moco_spec("v4", 32)


def test_backbones_sizes_and_feature_dims():
    macs = count_macs(SmallResNet(), 32)
    assert 30e6 <= macs <= 50e6  # the CPU-sized backbone the issue asks for
    # The demo's backbone: the slim stages with the full width's last one (1.7x the slim one's multiply-adds,
    # under half the full width's), so a linear probe reads 256 features.
    slim, wide = build_backbone("small_resnet_slim"), build_backbone("small_resnet_slim_wide")
    assert (slim[1], wide[1]) == (128, 256) and wide[0](torch.zeros(2, 3, 32, 32)).shape == (2, 256)
    assert 1.6 < count_macs(wide[0], 32) / count_macs(slim[0], 32) < 1.8
    assert count_macs(wide[0], 32) < 0.5 * macs
    net, dim = build_backbone("resnet18", cifar_stem=True)
    assert dim == 512 and net(torch.zeros(2, 3, 32, 32)).shape == (2, 512)
    assert "fc.weight" not in net.state_dict() and "conv1.weight" in net.state_dict()  # torchvision names
    _, dim50 = build_backbone("resnet50")
    assert dim50 == 2048
    with pytest.raises(ValueError, match="model.arch"):
        build_backbone("vgg11")
