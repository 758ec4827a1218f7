"""The CUDA training paths, run on CPU tensors: batched augmentation and the compiled step."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from covidseg.config import AugmentParams, LossParams, parse_params
from covidseg.training.augment import augment_batch, augment_slice, draw
from covidseg.training.dataset import BalancedSampler, DrawnSlices, SliceDataset
from covidseg.training.losses import SegmentationLoss
from covidseg.training.model import build_model
from covidseg.training.train import LossMeter, _forward_loss, device_batch, forward_loss


def textured_slices(count: int, size: int, labels: int) -> tuple[np.ndarray, np.ndarray]:
    """Smooth random images in [0, 1] with blob masks holding labels 0..labels-1."""
    rng = np.random.default_rng(7)
    yy, xx = np.mgrid[:size, :size] / size
    images, masks = [], []
    for _ in range(count):
        fy, fx, phase = rng.uniform(1, 4, 3)
        image = 0.5 + 0.4 * np.sin(2 * np.pi * (fy * yy + fx * xx) + phase)
        image += 0.05 * rng.standard_normal((size, size))
        images.append(np.clip(image, 0, 1).astype(np.float32))
        mask = np.zeros((size, size), np.uint8)
        for label in range(1, labels):
            cy, cx = rng.uniform(0.2, 0.8, 2)
            mask[(yy - cy) ** 2 + (xx - cx) ** 2 < 0.02 * label] = label
        masks.append(mask)
    return np.stack(images), np.stack(masks)


@pytest.mark.parametrize(
    ("params", "sided"),
    [
        (AugmentParams(), False),
        (AugmentParams(rotate_deg=30, scale=0.3, intensity=0.3), True),
        (AugmentParams(rotate_deg=0, scale=0, intensity=0.2), True),
    ],
)
def test_batch_augmentation_equals_per_slice_augmentation(params, sided) -> None:
    images, masks = textured_slices(8, 48, labels=4 if sided else 2)
    seeds = list(range(100, 108))
    rows = torch.stack([draw(params, np.random.default_rng(s)).row() for s in seeds])
    assert (rows[:, 0] > 0.5).any() and (rows[:, 0] < 0.5).any()  # some flipped, some not
    out, out_mask = augment_batch(
        torch.from_numpy(images)[:, None], torch.from_numpy(masks), rows, params, sided=sided
    )
    for k, seed in enumerate(seeds):
        ref, ref_mask = augment_slice(
            images[k], masks[k], params, np.random.default_rng(seed), sided=sided
        )
        np.testing.assert_allclose(out[k, 0].numpy(), ref, atol=1e-5)
        np.testing.assert_array_equal(out_mask[k].numpy(), ref_mask)
        assert not np.array_equal(ref, images[k])  # the transform did something


def test_loader_of_drawn_slices_augments_as_the_dataset_does(prepared) -> None:
    stores = sorted(prepared[0].glob("*.h5"))
    params = AugmentParams(rotate_deg=20, scale=0.2, intensity=0.2)
    plain = SliceDataset(stores, params)
    drawn = DrawnSlices(plain, params)
    sampler = BalancedSampler(drawn.positive, 0.5, 8, seed=3)
    items = list(sampler)
    loader = DataLoader(drawn, batch_size=8, sampler=sampler)
    image, target = device_batch(next(iter(loader)), loader, torch.device("cpu"))
    expected = [plain[item] for item in items]  # the CPU path: augmented per slice
    np.testing.assert_allclose(image.numpy(), torch.stack([e[0] for e in expected]), atol=1e-5)
    assert target.dtype == torch.long
    np.testing.assert_array_equal(target.numpy(), torch.stack([e[1] for e in expected]).long())


def test_loss_meter_on_the_device_matches_the_per_step_host_sum() -> None:
    cpu = torch.device("cpu")
    host, device = LossMeter(cpu), LossMeter(cpu, on_device=True)
    for value, slices in [(0.1, 2), (0.2, 16), (1.3, 2)]:
        loss = torch.tensor(value, dtype=torch.float32)
        host.add(loss, slices)
        device.add(loss, slices)
    assert isinstance(device.total, torch.Tensor) and device.total.dtype == torch.float64
    assert host.seen == device.seen == 20
    assert device.mean() == pytest.approx(host.mean(), rel=1e-12)  # a float64 sum as well
    assert host.mean() == pytest.approx((0.2 + 3.2 + 2.6) / 20, rel=1e-6)


def gradient(model: torch.nn.Module) -> torch.Tensor:
    """Every parameter's gradient, as one vector; the gradients are cleared."""
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None for g in grads)  # every parameter took part
    flat = torch.cat([g.flatten() for g in grads if g is not None])
    model.zero_grad(set_to_none=True)
    return flat


def test_compiled_step_gives_the_eager_loss_and_gradient() -> None:
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = build_model("Unet", "resnet18", None, 1).train()
    loss_fn = SegmentationLoss(LossParams(), 1)
    image = torch.rand(2, 1, 64, 64)
    target = (torch.rand(2, 64, 64) > 0.7).long()
    eager = _forward_loss(model, loss_fn, image, target, bf16=True)
    eager.backward()
    eager_grad = gradient(model)
    cpu = torch.device("cpu")
    compiled = forward_loss(True, cpu)
    assert compiled is not _forward_loss and forward_loss(False, cpu) is _forward_loss
    loss = compiled(model, loss_fn, image, target, bf16=True)
    loss.backward()
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # it did compile
    assert loss.item() == pytest.approx(eager.item(), rel=1e-5)
    # BatchNorm over 2x2 maps in the deepest stage amplifies float rounding to ~0.5 %
    error = (gradient(model) - eager_grad).norm() / eager_grad.norm()
    assert error < 1e-2


def test_train_compile_and_gpu_augment_are_params() -> None:
    params = parse_params({"train": {"compile": True, "gpu_augment": False}})
    assert params.train.compile is True and params.train.gpu_augment is False
    assert parse_params({}).train.compile is False  # off by default until measured
