import numpy as np
import pytest
import torch

from sagan.models import Generator
from sagan.viz import attention_figure, attention_figures, default_query_points, sample_grid


def test_sample_grid_layout_and_value_mapping():
    images = torch.full((16, 3, 32, 32), -1.0)
    images[0] = 1.0
    grid = sample_grid(images, nrow=4)
    assert grid.dtype == np.uint8 and grid.shape == (4 * 34 + 2, 4 * 34 + 2, 3)
    assert (grid[2:34, 2:34] == 255).all()  # first image: white
    assert (grid[2:34, 36:68] == 0).all()  # second image: black


def test_attention_figure_is_an_rgb_picture_with_a_panel_per_query():
    attn = torch.softmax(torch.randn(64, 16), dim=-1)
    one = attention_figure(torch.zeros(3, 32, 32), attn, [(8, 8)])
    three = attention_figure(torch.zeros(3, 32, 32), attn, [(8, 8), (8, 24), (24, 8)])
    assert one.dtype == np.uint8 and one.ndim == 3 and one.shape[2] == 3
    assert three.shape[1] > one.shape[1]  # wider: more panels
    assert one.std() > 0


def test_attention_figure_rejects_a_map_of_the_wrong_shape():
    with pytest.raises(ValueError, match=r"\(h\*w, h\*w/4\)"):
        attention_figure(torch.zeros(3, 32, 32), torch.rand(64, 64), [(8, 8)])


def test_attention_figures_one_per_attention_block():
    G = Generator(32, ch=8, z_dim=16, num_classes=3, attn_resolutions=(16, 32))
    figs = attention_figures(G, torch.randn(2, 16), torch.tensor([0, 1]))
    assert sorted(figs) == [16, 32]
    assert G.training  # restored after drawing
    assert default_query_points(32) == [(8, 8), (8, 24), (24, 8), (24, 24)]
