"""Placing the teacher's cells in the side-by-side layout: the host builds one index per cell, whatever the
channel count, and the channels expanded on the device put every value where a loop over levels, images and
channels puts it."""

import numpy as np
import pytest
import torch

from pkd_offline.pyramid import cell_positions, level_size, place_cells, stored_cross_hw

IMAGE_HW = [(61, 90), (40, 77), (64, 64)]  # ragged images in one batch padded to 64 x 96 px
PADDED_HW = (64, 96)
STRIDES = (8, 16)


def layout(folded: bool):
    """(levels, cells of one image): each teacher stride's student frame is half the teacher's map."""
    frames = [tuple(s // 2 for s in level_size(PADDED_HW, stride)) for stride in STRIDES]
    offsets = np.cumsum([0] + [h * w for h, w in frames]).tolist()
    return [(stride, frame, offset) for stride, frame, offset in zip(STRIDES, frames, offsets)], offsets[-1]


def maps_of(levels, channels: int, folded: bool, generator: torch.Generator) -> list[torch.Tensor]:
    """Random maps, levels outer then images: (C, h, w) of each image's stored projection, or of the frame."""
    return [torch.randn(channels, *(stored_cross_hw(level_size(hw, stride)) if folded else frame),
                        generator=generator)
            for stride, frame, _ in levels for hw in IMAGE_HW]


def placed_by_loops(maps, levels, channels: int, cells: int) -> torch.Tensor:
    """(C, N * cells): each value added at its image's level cell, rows and columns past the frame on its last."""
    out = torch.zeros(channels, len(IMAGE_HW) * cells, dtype=torch.float64)
    blocks = iter(maps)
    for _, (height, width), offset in levels:
        for n in range(len(IMAGE_HW)):
            block = next(blocks)
            for c in range(channels):
                for i in range(block.shape[1]):
                    for j in range(block.shape[2]):
                        k = n * cells + offset + min(i, height - 1) * width + min(j, width - 1)
                        out[c, k] += block[c, i, j].double()
    return out


@pytest.mark.parametrize("folded", [True, False])
def test_cells_land_where_a_loop_over_channels_puts_them(folded):
    levels, cells = layout(folded)
    generator = torch.Generator().manual_seed(0)
    channels = 3
    maps = maps_of(levels, channels, folded, generator)
    columns = torch.from_numpy(cell_positions(IMAGE_HW, levels, channels, cells, folded))
    placed = place_cells(torch.cat([m.flatten() for m in maps]), columns, channels, len(IMAGE_HW) * cells)
    torch.testing.assert_close(placed.double(), placed_by_loops(maps, levels, channels, cells), rtol=1e-6, atol=1e-6)


def test_values_after_a_first_part_are_found_from_its_length():
    """The mapped levels' cells follow the stored levels' values: ``first_value`` skips them."""
    levels, cells = layout(False)
    generator = torch.Generator().manual_seed(1)
    maps = maps_of(levels, 2, False, generator)
    values = torch.cat([m.flatten() for m in maps])
    ahead = torch.randn(17, generator=generator)
    columns = torch.from_numpy(cell_positions(IMAGE_HW, levels, 2, cells, False, first_value=17))
    torch.testing.assert_close(place_cells(torch.cat([ahead, values]), columns, 2, len(IMAGE_HW) * cells),
                               place_cells(values, columns - torch.tensor([[0], [17], [0]]), 2,
                                           len(IMAGE_HW) * cells))


def test_the_host_index_does_not_grow_with_the_channels():
    levels, cells = layout(True)
    few, many = (cell_positions(IMAGE_HW, levels, channels, cells, True) for channels in (2, 256))
    assert few.shape == many.shape == (3, sum(np.prod(stored_cross_hw(level_size(hw, stride)))
                                              for stride, _, _ in levels for hw in IMAGE_HW))
