"""Heatmaps that point at the finding: the stride-16 network, finding masks that follow augmentation, and the
localisation term of the foot model's training."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
import torch

from dicom_node.phantoms import generate_phantoms
from inference.cam import as_cam_network
from inference.networks import densenet121
from inference.preprocess import Letterbox
from inference.training.augment import augment
from inference.training.datasets import finding_masks, read_examples
from inference.training.trainer import localisation_loss


def test_stride_16_doubles_the_heatmap_grid_with_the_same_weights() -> None:
    coarse, fine = densenet121(1, 4, feature_stride=32), densenet121(1, 4, feature_stride=16)
    fine.load_state_dict(coarse.state_dict(), strict=True)  # the removed pooling has no parameters
    x = torch.rand(1, 1, 96, 96)
    with torch.no_grad():
        assert as_cam_network(coarse.eval())(x)[1].shape[-2:] == (3, 3)
        assert as_cam_network(fine.eval())(x)[1].shape[-2:] == (6, 6)


def box_mask(size: int, rows: slice, columns: slice) -> torch.Tensor:
    mask = torch.zeros(1, 1, size, size, dtype=torch.bool)
    mask[0, 0, rows, columns] = True
    return mask


def test_the_loss_is_low_when_the_true_class_map_peaks_in_the_box_and_high_elsewhere() -> None:
    weights = torch.eye(3)  # channel k is the map of class k
    masks = box_mask(64, slice(0, 32), slice(0, 32))  # the top-left quarter of a 64 px input, 4 x 4 cells
    inside, outside, other_class = (torch.zeros(1, 3, 4, 4) for _ in range(3))
    inside[0, 1, 0, 1] = 6.0
    outside[0, 1, 3, 3] = 6.0
    other_class[0, 2, 0, 1] = 6.0  # a peak in the box, but on another class's map
    truth = torch.tensor([1])
    assert localisation_loss(inside, weights[truth], masks) < 0.1
    assert localisation_loss(outside, weights[truth], masks) > 3.0
    assert localisation_loss(other_class, weights[truth], masks) == pytest.approx(-torch.log(torch.tensor(0.25)))


def test_images_without_a_box_do_not_count_and_a_tiny_box_counts_its_cell() -> None:
    weights, truth = torch.eye(2), torch.tensor([0, 0])
    feature_map = torch.zeros(2, 2, 4, 4)
    feature_map[0, 0, 0, 0] = 6.0  # image 0 points at cell (0, 0); image 1 (no box) points anywhere
    feature_map[1, 0, 2, 2] = 6.0
    tiny = torch.cat([box_mask(64, slice(1, 4), slice(1, 4)), torch.zeros(1, 1, 64, 64, dtype=torch.bool)])
    assert localisation_loss(feature_map, weights[truth], tiny) < 0.1
    nothing = torch.zeros(2, 1, 64, 64, dtype=torch.bool)
    assert localisation_loss(feature_map, weights[truth], nothing) == 0.0


def test_descending_the_loss_moves_the_peak_into_the_box() -> None:
    torch.manual_seed(0)
    feature_map = torch.rand(1, 8, 6, 6, requires_grad=True)
    weights, truth = torch.rand(4, 8), torch.tensor([3])
    masks = box_mask(96, slice(64, 96), slice(0, 32))  # cells (4..5, 0..1) of the 6 x 6 grid
    optimiser = torch.optim.SGD([feature_map], lr=0.5)
    for _ in range(50):
        optimiser.zero_grad()
        localisation_loss(torch.relu(feature_map), weights[truth], masks).backward()
        optimiser.step()
    cam = torch.einsum("chw,c->hw", torch.relu(feature_map[0]), weights[3])
    row, column = divmod(int(cam.argmax()), 6)
    assert row >= 4 and column <= 1


@pytest.fixture(scope="module")
def feet(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("feet")
    generate_phantoms(out, 6, seed=77, task="foot")
    return out


def test_finding_masks_cover_the_letterboxed_box(feet: Path) -> None:
    examples = read_examples(feet, "phantom", "hallux_valgus")
    masks = finding_masks(examples, 128)
    for example, mask in zip(examples, masks, strict=True):
        if example.finding_box is None:
            assert not mask.any()
            continue
        rows, columns = torch.nonzero(mask[0], as_tuple=True)
        header = pydicom.dcmread(example.path, stop_before_pixels=True)
        letterbox = Letterbox(header.Rows, header.Columns, 128)
        x0, y0, _, _ = letterbox.inner
        left, top, right, bottom = example.finding_box
        assert abs(int(columns.min()) - (left * letterbox.scale + x0)) <= 1
        assert abs(int(rows.max()) - (bottom * letterbox.scale + y0)) <= 1
        assert (
            abs(int(columns.max()) - (right * letterbox.scale + x0)) <= 1
            and abs(int(rows.min()) - (top * letterbox.scale + y0)) <= 1
        )


def test_augmentation_moves_the_masks_with_their_images() -> None:
    masks = torch.zeros(8, 1, 64, 64)
    for index in range(8):
        top, left = 4 + index * 5, 40 - index * 4
        masks[index, 0, top : top + 14, left : left + 12] = 1.0
    images = masks.clone()  # bright exactly where the finding is
    moved, moved_masks = augment(images, torch.Generator().manual_seed(3), masks)
    assert not torch.equal(moved_masks, masks), "the transform moved them"
    agreement = ((moved > 0.5) == (moved_masks > 0.5)).float().mean(dim=(1, 2, 3))
    assert (agreement > 0.99).all()
