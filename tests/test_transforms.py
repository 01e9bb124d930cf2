"""LEMUR's transform names beyond norm/echo: the grammar (host and runner read the same table), what each
step does to a real batch of digits on the device, and a complex-valued net trained through the runner.

The names and record counts below are facts counted over the 449,672 image-classification records of
LEMUR nn-dataset 2.1.2's statistics: every name with >= 500 records must be supported.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF

from lemur_agent_server.evaluator.requests import EvalRequest
from sandbox import datasets, protocol
from sandbox.runner import params, transforms
from sandbox.runner.loader import apply_transform, eval_batches
from tests.test_runner import SETUP_AND_LEARN, digits, run_job  # noqa: F401  (digits: module fixture)

LEMUR_RECORDS = {  # name -> image-classification records (names already supported before are left out)
    "norm": 13912, "echo": 13038, "norm_flip": 20325, "echo_flip": 11306, "norm_512": 10856,
    "norm_512_flip": 9644, "echo_512": 7665, "echo_512_flip": 7504, "complex_64": 1519, "soft_pad": 1331,
    "complex": 918, "complex_64_flip": 854, "bf-v1-RandomCrop_Pad_RandomHorizontalFlip": 701, "complex_32": 684,
    "complex_128": 654, "complex_32_flip": 640, "complex_256": 596, "complex_128_flip": 503,
}
BF = "bf-v1-RandomCrop_Pad_RandomHorizontalFlip"


# --- grammar --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(LEMUR_RECORDS))
def test_every_lemur_name_with_500_records_is_supported_alike_by_host_and_runner(name: str) -> None:
    host = protocol.parse_transform(name, 28)
    assert params.parse_transform(name, 28) == host  # the runner's grammar is the host's
    assert host.name == name and name in datasets.ALL_TRANSFORMS
    assert datasets.transform_size(name, 28) == host.size == host.side(28)
    assert protocol.validate_search_space({"transform": {"choices": [name]}}) == []
    space = {"transform": {"choices": [name]}}  # the server's door asks the same validator
    assert EvalRequest(code="x", dataset="digits", search_space=space).search_space == space
    assert protocol.describe_transform(name)


def test_complex_names_decode_to_complex_input_of_their_size() -> None:
    for name in [t for t in protocol.transform_names() if t.startswith("complex")]:
        tf = protocol.parse_transform(name, 8)
        assert tf.complex and not tf.normalize and tf.flip == name.endswith("_flip")
        assert tf.size == (int(name.split("_")[1]) if name[len("complex"):].lstrip("_")[:1].isdigit() else 8)
        assert not tf.searched_by_default
    assert len([t for t in protocol.transform_names() if t.startswith("complex")]) == 2 * (7 + 1)


def test_named_recipes_have_fixed_sizes_whatever_the_dataset() -> None:
    soft, bf = protocol.parse_transform("soft_pad", 28), protocol.parse_transform(BF, 8)
    assert (soft.size, soft.fit, soft.normalize, soft.flip) == (800, protocol.FIT_PAD, False, False)
    assert (bf.size, bf.crop, bf.pad, bf.flip, bf.flip_p, bf.normalize) == (64, 29, 1, True, 0.64, True)
    assert not soft.searched_by_default and not bf.searched_by_default
    # only plain names are searched unasked: a default search must never hand a real-valued net complex input
    assert datasets.TRANSFORMS == [t for t in datasets.ALL_TRANSFORMS if t.startswith(("norm", "echo"))]
    assert len(datasets.TRANSFORMS) == 32


def test_the_catalog_describes_every_name_from_its_steps() -> None:
    catalog = protocol.transform_catalog()
    assert list(catalog) == protocol.transform_names()
    assert "complex64" in catalog["complex_64"] and "64x64" in catalog["complex_64"]
    assert "own size" in catalog["complex"] and "not normalised" in catalog["complex"]
    assert "zero-pad" in catalog["soft_pad"] and "800x800" in catalog["soft_pad"]
    assert all(word in catalog[BF] for word in ("29x29", "centred in evaluation", "0.64", "64x64", "normalise"))
    assert "flip" in catalog["norm_32_flip"] and "flip" not in catalog["norm_32"]


@pytest.mark.parametrize(("typo", "closest"), [("complx_64", "complex_64"), ("soft-pad", "soft_pad"),
                                               ("complex_31", "complex_32"), ("bf-v1-RandomCrop_Pad", BF)])
def test_an_unknown_name_names_the_closest_supported_ones(typo: str, closest: str) -> None:
    with pytest.raises(ValueError, match="unknown transform") as err:
        protocol.parse_transform(typo)
    assert closest in str(err.value).split("closest:")[1]


# --- the steps on a real batch --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def batch(digits: datasets.PreparedDataset) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # noqa: F811
    """32 digits as uint8 NCHW (8x8) and the dataset's mean/std as the loader shapes them."""
    x = torch.from_numpy(np.load(Path(digits.spec_fields()["data_dir"]) / "train_x.npy")[:32].copy())
    info = digits.info
    return x, torch.tensor(info.mean).view(1, -1, 1, 1), torch.tensor(info.std).view(1, -1, 1, 1)


def _seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_complex_transforms_hand_the_model_complex64_pixels(batch: tuple) -> None:
    x, mean, std = batch
    out = apply_transform(x, protocol.parse_transform("complex_64", 8), mean, std, train=False)
    assert out.dtype == torch.complex64 and out.shape == (32, 1, 64, 64)
    assert torch.equal(out.imag, torch.zeros_like(out.imag))
    assert out.real.min() >= 0 and out.real.max() <= 1 and out.real.max() > 0.5
    echo = apply_transform(x, protocol.parse_transform("echo_64", 8), mean, std, train=False)
    assert torch.equal(out.real, echo)  # the same pixels, only the dtype differs
    native = apply_transform(x, protocol.parse_transform("complex", 8), mean, std, train=False)
    assert native.shape == (32, 1, 8, 8) and torch.allclose(native.real, x.float() / 255)


def test_complex_flip_flips_only_training_batches(batch: tuple) -> None:
    x, mean, std = batch
    tf = protocol.parse_transform("complex_32_flip", 8)
    plain = apply_transform(x, tf, mean, std, train=False)
    assert torch.equal(plain, apply_transform(x, protocol.parse_transform("complex_32", 8), mean, std, False))
    trained = apply_transform(x, tf, mean, std, train=True, generator=_seeded(0))
    assert trained.dtype == torch.complex64
    flipped = [bool(torch.equal(t, p.flip(-1))) and not torch.equal(t, p) for t, p in zip(trained, plain)]
    kept = [bool(torch.equal(t, p)) for t, p in zip(trained, plain)]
    assert all(f or k for f, k in zip(flipped, kept)) and 0 < sum(flipped) < 32


def test_soft_pad_zero_pads_right_and_bottom_to_800(batch: tuple) -> None:
    x, mean, std = batch
    tf = protocol.parse_transform("soft_pad", 8)
    out = apply_transform(x[:4], tf, mean, std, train=False)
    assert out.dtype == torch.float32 and out.shape == (4, 1, 800, 800)
    assert torch.equal(out[:, :, :8, :8], x[:4].float() / 255)
    assert out[:, :, 8:, :].abs().sum() == 0 and out[:, :, :, 8:].abs().sum() == 0
    assert torch.equal(apply_transform(x[:4], tf, mean, std, train=True, generator=_seeded(1)), out)
    big = transforms.pad_to(torch.rand(2, 1, 900, 900), 800)  # larger images shrink to one shape
    assert big.shape == (2, 1, 800, 800)


def test_symmetric_pad_and_centre_crop_match_torchvision(batch: tuple) -> None:
    x, _, _ = batch
    xf = x.float() / 255
    for pad in (1, 2, 3):
        assert torch.equal(transforms.pad_symmetric(xf, pad), TF.pad(xf, [pad], padding_mode="symmetric"))
    for side in (5, 6, 8, 12):
        assert torch.equal(transforms.crop(xf, side, train=False), TF.center_crop(xf, [min(side, 8)] * 2))


def test_random_crop_takes_a_window_per_image_from_the_trial_seed(batch: tuple) -> None:
    x, _, _ = batch
    xf = x.float() / 255
    a = transforms.crop(xf, 5, train=True, generator=_seeded(3))
    assert a.shape == (32, 1, 5, 5)
    assert torch.equal(a, transforms.crop(xf, 5, train=True, generator=_seeded(3)))
    assert not torch.equal(a, transforms.crop(xf, 5, train=True, generator=_seeded(4)))
    places = set()
    for img, window in zip(xf, a):  # each window is a true 5x5 sub-image of its own image
        hits = [(i, j) for i in range(4) for j in range(4) if torch.equal(img[:, i:i + 5, j:j + 5], window)]
        assert hits
        places.add(hits[0])
    assert len(places) > 4  # offsets differ between the images of one batch


def test_bf_v1_crop_pad_flip_recipe(batch: tuple) -> None:
    x, mean, std = batch
    x32 = (transforms.resize(x.float(), 32)).round().clamp(0, 255).to(torch.uint8)  # digits at CIFAR's side
    tf = protocol.parse_transform(BF, 32)
    ev = apply_transform(x32, tf, mean, std, train=False)
    assert ev.dtype == torch.float32 and ev.shape == (32, 1, 64, 64)
    expected = TF.pad(TF.center_crop(x32.float() / 255, [29, 29]), [1], padding_mode="symmetric")
    expected = (transforms.resize(expected, 64) - mean) / std
    assert torch.allclose(ev, expected, atol=1e-6)
    assert torch.equal(ev, apply_transform(x32, tf, mean, std, train=False))  # evaluation is deterministic
    tr = apply_transform(x32, tf, mean, std, train=True, generator=_seeded(5))
    assert tr.shape == ev.shape and not torch.equal(tr, ev)
    assert torch.equal(tr, apply_transform(x32, tf, mean, std, train=True, generator=_seeded(5)))
    assert float(ev.min()) < 0 < float(ev.max())  # normalised, not in [0, 1]


def test_flip_probability_is_the_recipes(batch: tuple) -> None:
    x, _, _ = batch
    one = (x[:1].float() / 255).expand(4000, -1, -1, -1)
    flipped = transforms.random_flip(one, 0.64, _seeded(6))
    share = float((flipped != one).flatten(1).any(1).float().mean())
    assert 0.61 < share < 0.67


def test_eval_batches_use_the_deterministic_part(batch: tuple) -> None:
    x, mean, std = batch
    tf = protocol.parse_transform("complex_32_flip", 8)
    out = torch.cat(list(eval_batches(x, tf, mean, std, batch=10)))
    assert out.dtype == torch.complex64 and torch.equal(out, apply_transform(x, tf, mean, std, train=False))


# --- a complex-valued net through the runner ------------------------------------------------------------
COMPLEX_NET = (
    """
import torch
from torch import nn


def supported_hyperparameters():
    return {'lr', 'momentum'}


class Net(nn.Module):
    # a complex linear layer (real and imaginary weights), its magnitude, then real logits
    def __init__(self, in_shape, out_shape, prm, device):
        super().__init__()
        n = in_shape[1] * in_shape[2] * in_shape[3]
        self.fr, self.fi = nn.Linear(n, 32), nn.Linear(n, 32)
        self.out = nn.Linear(32, out_shape[0])

    def forward(self, x):
        z = x.flatten(1)
        re = self.fr(z.real) - self.fi(z.imag)
        im = self.fr(z.imag) + self.fi(z.real)
        return self.out(torch.sqrt(re * re + im * im + 1e-6))
"""
    + SETUP_AND_LEARN
)


def test_a_complex_valued_net_trains_on_digits_with_complex_input(
    tmp_path: Path, digits: datasets.PreparedDataset  # noqa: F811
) -> None:
    run = run_job(tmp_path, digits, COMPLEX_NET, mode="train", n_trials=1, epochs=2.0, eval_every=1.0, seed=0,
                  time_budget_s=60, fixed_prm={"transform": "complex_32_flip", "lr": 0.05, "momentum": 0.9,
                                                "batch": 32})
    assert run.rc == 0, run.log
    check = run.one(protocol.EVENT_CHECK)
    assert check["in_shape"] == [1, 1, 32, 32] and check["flops"] > 0
    end = run.one(protocol.EVENT_TRIAL_END)
    assert end["status"] == "completed" and end["val_accuracy"] > 0.6, end
    preds = np.load(run.out / run.of(protocol.EVENT_POINT)[-1]["preds"])
    assert np.mean(preds == digits.test_labels) > 0.6


def test_the_same_net_fails_on_real_input_as_lemur_reports(
    tmp_path: Path, digits: datasets.PreparedDataset  # noqa: F811
) -> None:
    run = run_job(tmp_path, digits, COMPLEX_NET, mode="check", fixed_prm={"transform": "norm_32"})
    assert run.rc == 2
    assert "imag is not implemented" in run.one(protocol.EVENT_ERROR)["message"]
