"""Foreign weights: MMDetection Swin checkpoints, torchvision detection state dicts, ImageNet backbones.

Checkpoints are built in memory with the real key names and shapes (MMDetection's from its Swin,
PatchMerging, FFN and FPN modules; torchvision's from its own builders), filled with random values,
saved to disk and loaded the way a user's file is. MMDetection's computations are re-implemented here
independently (unfold patch merging, window attention, FPN) so the checks do not use our mapping.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.models.swin_transformer import PatchMerging

from pkd_offline.errors import PkdError
from pkd_offline.models import build_detector
from pkd_offline.models.foreign_weights import load_backbone_weights, unfold_to_concat_order
from pkd_offline.models.swin import TINY_SWIN
from pkd_offline.teachers import load_teacher

FPN = 64  # the tiny variant's FPN width
WINDOW = 7


def mmdet_relative_position_index(window: int) -> torch.Tensor:
    """MMDetection WindowMSA's buffer: a double-step sequence plus its transpose, flipped along dim 1."""
    steps = (torch.arange(window) * (2 * window - 1))[:, None] + torch.arange(window)[None, :]
    coords = steps.reshape(1, -1)
    return (coords + coords.T).flip(1).contiguous()  # (window**2, window**2)


def mmdet_swin_state(embed: int, depths, heads, generator: torch.Generator, fpn: int = FPN) -> dict:
    """The state_dict of an MMDetection Mask R-CNN with a Swin backbone and an FPN neck, random values."""
    def rand(*shape):
        return torch.randn(*shape, generator=generator) * 0.2

    state = {"backbone.patch_embed.projection.weight": rand(embed, 3, 4, 4),
             "backbone.patch_embed.projection.bias": rand(embed),
             "backbone.patch_embed.norm.weight": 1 + rand(embed), "backbone.patch_embed.norm.bias": rand(embed)}
    for stage, (depth, head) in enumerate(zip(depths, heads)):
        c = embed * 2 ** stage
        for block in range(depth):
            p = f"backbone.stages.{stage}.blocks.{block}."
            state.update({
                p + "norm1.weight": 1 + rand(c), p + "norm1.bias": rand(c),
                p + "attn.w_msa.relative_position_bias_table": rand((2 * WINDOW - 1) ** 2, head),
                p + "attn.w_msa.relative_position_index": mmdet_relative_position_index(WINDOW),
                p + "attn.w_msa.qkv.weight": rand(3 * c, c), p + "attn.w_msa.qkv.bias": rand(3 * c),
                p + "attn.w_msa.proj.weight": rand(c, c), p + "attn.w_msa.proj.bias": rand(c),
                p + "norm2.weight": 1 + rand(c), p + "norm2.bias": rand(c),
                p + "ffn.layers.0.0.weight": rand(4 * c, c), p + "ffn.layers.0.0.bias": rand(4 * c),
                p + "ffn.layers.1.weight": rand(c, 4 * c), p + "ffn.layers.1.bias": rand(c)})
        if stage < len(depths) - 1:
            p = f"backbone.stages.{stage}.downsample."
            state.update({p + "norm.weight": 1 + rand(4 * c), p + "norm.bias": rand(4 * c),
                          p + "reduction.weight": rand(2 * c, 4 * c)})
        state[f"backbone.norm{stage}.weight"] = 1 + rand(c)
        state[f"backbone.norm{stage}.bias"] = rand(c)
        state[f"neck.lateral_convs.{stage}.conv.weight"] = rand(fpn, c, 1, 1)
        state[f"neck.lateral_convs.{stage}.conv.bias"] = rand(fpn)
        state[f"neck.fpn_convs.{stage}.conv.weight"] = rand(fpn, fpn, 3, 3) * 0.3
        state[f"neck.fpn_convs.{stage}.conv.bias"] = rand(fpn)
    state.update({"rpn_head.rpn_conv.weight": rand(fpn, fpn, 3, 3), "rpn_head.rpn_cls.weight": rand(3, fpn, 1, 1),
                  "roi_head.bbox_head.fc_cls.weight": rand(81, 1024), "roi_head.mask_head.convs.0.conv.weight":
                  rand(256, fpn, 3, 3)})
    return state


@pytest.fixture(scope="module")
def mmdet_state() -> dict:
    embed, depths, heads = TINY_SWIN
    return mmdet_swin_state(embed, depths, heads, torch.Generator().manual_seed(0))


def save_mmdet(path, state: dict):
    torch.save({"meta": {"epoch": 36, "mmdet_version": "2.16.0"}, "state_dict": state}, path)
    return path


def teacher_from(path, name: str = "swin"):
    return load_teacher(name, checkpoint=path, random_init=False, variant="full", num_classes=3)


def mmdet_patch_merging(x: torch.Tensor, norm: nn.LayerNorm, reduction: nn.Linear) -> torch.Tensor:
    """MMDetection's PatchMerging: (B, H, W, C) -> nn.Unfold(2, stride 2) -> LayerNorm -> Linear."""
    b, h, w, c = x.shape
    patches = nn.Unfold(kernel_size=2, stride=2)(x.permute(0, 3, 1, 2))  # (B, 4C, H/2 * W/2)
    merged = reduction(norm(patches.transpose(1, 2)))
    return merged.reshape(b, h // 2, w // 2, -1)


def test_patch_merging_with_converted_weights_equals_mmdetection_unfold_merging():
    torch.manual_seed(0)
    c = 6
    norm, reduction = nn.LayerNorm(4 * c), nn.Linear(4 * c, 2 * c, bias=False)
    nn.init.normal_(norm.weight, 1, 0.5), nn.init.normal_(norm.bias, 0, 0.5)
    x = torch.randn(2, 8, 10, c)
    expected = mmdet_patch_merging(x, norm, reduction)

    ours = PatchMerging(c)
    with torch.no_grad():
        ours.reduction.weight.copy_(unfold_to_concat_order(reduction.weight))
        ours.norm.weight.copy_(unfold_to_concat_order(norm.weight))
        ours.norm.bias.copy_(unfold_to_concat_order(norm.bias))
    torch.testing.assert_close(ours(x), expected, rtol=1e-5, atol=1e-5)

    with torch.no_grad():  # the weights copied as they are give another function: the reorder matters
        ours.reduction.weight.copy_(reduction.weight)
        ours.norm.weight.copy_(norm.weight)
        ours.norm.bias.copy_(norm.bias)
    assert (ours(x) - expected).abs().max() > 0.1


def test_mmdetection_relative_position_index_equals_torchvision():
    block = torchvision.models.swin_transformer.SwinTransformerBlock(8, 2, [WINDOW, WINDOW], [0, 0])
    assert torch.equal(block.attn.relative_position_index, mmdet_relative_position_index(WINDOW).reshape(-1))


def test_mmdet_swin_checkpoint_loads_with_every_tensor_in_place(tmp_path, mmdet_state):
    teacher, identity = teacher_from(save_mmdet(tmp_path / "mask_rcnn_swin.pth", mmdet_state))
    assert identity["checkpoint_format"] == "mmdet-swin" and identity["variant"] == "tiny"
    assert identity["checkpoint_unused"] == {"roi_head": 2, "rpn_head": 2}
    assert len(identity["checkpoint_sha256"]) == 64
    body = teacher.detector.backbone.body
    s = mmdet_state
    assert torch.equal(body.features[0][0].weight, s["backbone.patch_embed.projection.weight"])
    assert torch.equal(body.features[0][2].bias, s["backbone.patch_embed.norm.bias"])
    assert torch.equal(body.features[5][1].attn.qkv.weight, s["backbone.stages.2.blocks.1.attn.w_msa.qkv.weight"])
    assert torch.equal(body.features[7][0].mlp[3].weight, s["backbone.stages.3.blocks.0.ffn.layers.1.weight"])
    assert torch.equal(body.features[3][0].attn.relative_position_bias_table,
                       s["backbone.stages.1.blocks.0.attn.w_msa.relative_position_bias_table"])
    assert torch.equal(body.norms[2].weight, s["backbone.norm2.weight"])
    # stage N's downsample sits after stage N: features[2N + 2], input width 4 * C_N
    assert torch.equal(body.features[4].reduction.weight,
                       unfold_to_concat_order(s["backbone.stages.1.downsample.reduction.weight"]))
    assert body.features[6].norm.weight.shape == s["backbone.stages.2.downsample.norm.weight"].shape
    assert not any(p.requires_grad for p in teacher.parameters())


def window_block(x: torch.Tensor, s: dict, p: str, heads: int) -> torch.Tensor:
    """An unshifted MMDetection SwinBlock on one 7x7 window, (B, 49, C) -> (B, 49, C), weights by key."""
    b, n, c = x.shape
    y = F.layer_norm(x, (c,), s[p + "norm1.weight"], s[p + "norm1.bias"])
    qkv = F.linear(y, s[p + "attn.w_msa.qkv.weight"], s[p + "attn.w_msa.qkv.bias"])
    q, k, v = qkv.reshape(b, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
    index = s[p + "attn.w_msa.relative_position_index"].reshape(-1)
    bias = s[p + "attn.w_msa.relative_position_bias_table"][index].reshape(n, n, heads).permute(2, 0, 1)
    attention = ((q * (c // heads) ** -0.5) @ k.transpose(-2, -1) + bias).softmax(-1)
    x = x + F.linear((attention @ v).transpose(1, 2).reshape(b, n, c), s[p + "attn.w_msa.proj.weight"],
                     s[p + "attn.w_msa.proj.bias"])
    y = F.layer_norm(x, (c,), s[p + "norm2.weight"], s[p + "norm2.bias"])
    hidden = F.gelu(F.linear(y, s[p + "ffn.layers.0.0.weight"], s[p + "ffn.layers.0.0.bias"]))
    return x + F.linear(hidden, s[p + "ffn.layers.1.weight"], s[p + "ffn.layers.1.bias"])


def test_converted_attention_block_matches_mmdetection_computation(tmp_path, mmdet_state):
    teacher, _ = teacher_from(save_mmdet(tmp_path / "swin.pth", mmdet_state))
    c = TINY_SWIN[0] * 4
    x = torch.randn(2, WINDOW, WINDOW, c, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = teacher.detector.backbone.body.features[5][0](x)
        expected = window_block(x.reshape(2, WINDOW * WINDOW, c), mmdet_state, "backbone.stages.2.blocks.0.", heads=4)
    torch.testing.assert_close(ours.reshape(2, -1, c), expected, rtol=1e-4, atol=1e-4)


def test_converted_fpn_outputs_equal_mmdetection_fpn(tmp_path, mmdet_state):
    teacher, _ = teacher_from(save_mmdet(tmp_path / "swin.pth", mmdet_state))
    backbone = teacher.detector.backbone
    image = torch.randn(1, 3, 64, 96, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        inputs = list(backbone.body(image).values())
        outputs = list(backbone(image).values())
    s = mmdet_state
    laterals = [F.conv2d(c, s[f"neck.lateral_convs.{i}.conv.weight"], s[f"neck.lateral_convs.{i}.conv.bias"])
                for i, c in enumerate(inputs)]
    for i in range(len(laterals) - 1, 0, -1):  # MMDetection FPN: top-down, nearest, to the lower level's size
        laterals[i - 1] = laterals[i - 1] + F.interpolate(laterals[i], size=laterals[i - 1].shape[-2:], mode="nearest")
    expected = [F.conv2d(m, s[f"neck.fpn_convs.{i}.conv.weight"], s[f"neck.fpn_convs.{i}.conv.bias"], padding=1)
                for i, m in enumerate(laterals)]
    expected.append(F.max_pool2d(expected[-1], 1, stride=2))  # num_outs 5 without extra convs
    assert len(outputs) == 5
    for got, want in zip(outputs, expected):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("damage, listed", [
    ("missing", "backbone.stages.2.blocks.1.ffn.layers.1.weight"),
    ("extra", "backbone.absolute_pos_embed"),
    ("misshapen", "neck.fpn_convs.3.conv.weight"),
])
def test_mmdet_checkpoint_that_does_not_fit_names_the_keys(tmp_path, mmdet_state, damage, listed):
    state = dict(mmdet_state)
    if damage == "missing":
        del state[listed]
    elif damage == "extra":
        state[listed] = torch.zeros(1, 256, TINY_SWIN[0])
    else:
        state[listed] = torch.zeros(FPN, FPN, 1, 1)
    with pytest.raises(PkdError, match=f"1 {damage if damage != 'extra' else 'unexpected'}: {listed}"):
        teacher_from(save_mmdet(tmp_path / "swin.pth", state))


def test_mmdet_checkpoint_without_index_buffers_keeps_ours(tmp_path, mmdet_state):
    """A checkpoint without the (derived) relative position index buffers loads with the model's own index,
    and gives exactly the teacher that the full checkpoint gives."""
    state = {k: v for k, v in mmdet_state.items() if not k.endswith("relative_position_index")}
    assert len(state) < len(mmdet_state)
    teacher, identity = teacher_from(save_mmdet(tmp_path / "swin.pth", state))
    assert identity["checkpoint_format"] == "mmdet-swin"
    full, _ = teacher_from(save_mmdet(tmp_path / "full.pth", mmdet_state))
    indices = {k: v for k, v in teacher.state_dict().items() if k.endswith("relative_position_index")}
    assert len(indices) == sum(TINY_SWIN[1])
    expected = mmdet_relative_position_index(WINDOW).reshape(-1)
    assert all(torch.equal(index.reshape(-1), expected) for index in indices.values())
    reference = full.state_dict()
    assert all(torch.equal(value, reference[k]) for k, value in teacher.state_dict().items() if "backbone" in k)
    image = torch.rand(3, 64, 96, generator=torch.Generator().manual_seed(9))
    with torch.inference_mode():
        got, _ = teacher.eval().features([image])
        want, _ = full.eval().features([image])
    assert got.keys() == want.keys() and all(torch.equal(got[s], want[s]) for s in got)


def test_mmdet_swin_size_must_match_the_teacher_name(tmp_path):
    generator = torch.Generator().manual_seed(3)
    state = {"backbone.patch_embed.projection.weight": torch.zeros(96, 3, 4, 4)}
    for stage, (depth, heads) in enumerate(zip((2, 2, 18, 2), (3, 6, 12, 24))):  # Swin-S: shapes only matter here
        for block in range(depth):
            state[f"backbone.stages.{stage}.blocks.{block}.attn.w_msa.relative_position_bias_table"] = \
                torch.randn(169, heads, generator=generator)
    with pytest.raises(PkdError, match="pass --teacher swin_s"):
        teacher_from(save_mmdet(tmp_path / "swin_s.pth", state), name="swin")
    with pytest.raises(PkdError, match="pass --teacher swin_s"):
        teacher_from(save_mmdet(tmp_path / "swin_s.pth", state), name="resnet50")


def randomise_batch_norms(model: nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, (nn.BatchNorm2d, torchvision.ops.FrozenBatchNorm2d)):
            module.running_mean.copy_(torch.randn(module.running_mean.shape, generator=generator) * 0.1)
            module.running_var.copy_(torch.rand(module.running_var.shape, generator=generator) + 0.5)
            module.weight.data.copy_(torch.rand(module.weight.shape, generator=generator) + 0.5)


@pytest.mark.parametrize("builder, strides", [
    (torchvision.models.detection.fasterrcnn_resnet50_fpn_v2, (4, 8, 16, 32, 64)),  # BatchNorm FPN, P2..P6
    (torchvision.models.detection.retinanet_resnet50_fpn_v2, (8, 16, 32, 64, 128)),  # C3..C5, P6 from C5
    (torchvision.models.detection.fasterrcnn_resnet50_fpn, (4, 8, 16, 32, 64)),  # FrozenBatchNorm body
])
def test_torchvision_detection_state_dict_loads_into_resnet50_teacher(tmp_path, builder, strides):
    torch.manual_seed(4)
    reference = builder(weights=None, weights_backbone=None, num_classes=91).eval()
    with torch.no_grad():
        randomise_batch_norms(reference, 5)
    path = tmp_path / "tv.pth"
    torch.save(reference.state_dict(), path)
    teacher, identity = teacher_from(path, name="resnet50")
    assert identity["checkpoint_format"] == "torchvision-detection" and identity["variant"] == "full"
    assert set(identity["checkpoint_unused"]) <= {"rpn", "roi_heads", "head"}
    assert teacher.strides == strides
    image = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        expected, got = reference.backbone(image), teacher.detector.backbone(image)
    assert len(got) == len(expected) == 5
    for want, have in zip(expected.values(), got.values()):
        torch.testing.assert_close(have, want, rtol=1e-4, atol=1e-4)


def test_project_checkpoint_identity_names_its_format(tmp_path):
    from pkd_offline.checkpoint import save_checkpoint

    model = build_detector("swin", num_classes=3, variant="tiny")
    save_checkpoint(tmp_path / "model.pt", {"spec": model.spec, "model": model.state_dict()})
    _, identity = teacher_from(tmp_path / "model.pt")
    assert identity["checkpoint_format"] == "pkd-offline" and "checkpoint_unused" not in identity


def test_imagenet_classification_file_is_refused_as_a_teacher(tmp_path):
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "resnet18.pth")
    with pytest.raises(PkdError, match="ImageNet classification weights"):
        teacher_from(tmp_path / "resnet18.pth", name="resnet50")


def test_imagenet_weights_load_into_student_backbone(tmp_path):
    torch.manual_seed(7)
    classifier = torchvision.models.resnet18().eval()
    with torch.no_grad():
        randomise_batch_norms(classifier, 8)
    state = {k: v for k, v in classifier.state_dict().items() if not k.endswith("num_batches_tracked")}  # old files
    torch.save(state, tmp_path / "resnet18-f37072fd.pth")
    student = build_detector("retinanet", num_classes=3, variant="full", backbone="resnet18").eval()
    ignored = load_backbone_weights(student, tmp_path / "resnet18-f37072fd.pth")
    assert ignored == ["fc.bias", "fc.weight"]
    body = student.detector.backbone.body
    assert torch.equal(body.layer3[1].conv2.weight, classifier.layer3[1].conv2.weight)
    image = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        expected = nn.Sequential(*list(classifier.children())[:-2])(image)
        torch.testing.assert_close(body(image)["2"], expected)


def test_imagenet_weights_that_do_not_fit_are_refused(tmp_path):
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "resnet18.pth")
    tiny = build_detector("retinanet", num_classes=3, variant="tiny", backbone="resnet18")
    with pytest.raises(PkdError, match="unexpected: layer1.1.bn1.bias"):
        load_backbone_weights(tiny, tmp_path / "resnet18.pth")
    other = build_detector("retinanet", num_classes=3, variant="full", backbone="resnet50")
    with pytest.raises(PkdError, match="misshapen: conv1.weight|missing"):
        load_backbone_weights(other, tmp_path / "resnet18.pth")


def test_pretrained_backbone_norms_stay_frozen_in_training(tmp_path):
    from torchvision.models import resnet18

    path = tmp_path / "resnet18-imagenet.pth"
    torch.save(resnet18(weights=None).state_dict(), path)
    model = build_detector("retinanet", num_classes=3, variant="full", backbone="resnet18")
    load_backbone_weights(model, path)
    model.train()
    norm = model.detector.backbone.body.bn1
    before = norm.running_mean.clone()
    image = torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(8))
    model([image], [{"boxes": torch.tensor([[4.0, 4, 30, 30]]), "labels": torch.tensor([1])}])
    assert not norm.training and not norm.weight.requires_grad
    assert torch.equal(norm.running_mean, before), "frozen statistics must not move"
    assert model.spec["frozen_backbone_norm"] is True


def test_small_inputs_are_flagged_for_mmdetection_swin_teachers_only():
    from pkd_offline.models.swin_window import small_input_warning

    mmdet = {"name": "swin_s", "checkpoint_format": "mmdet-swin"}
    assert small_input_warning(mmdet, [(800, 1088), (256, 256)]) is None  # stage 4: 8 tokens > the 7-token window
    line = small_input_warning(mmdet, [(800, 1088), (224, 1088), (800, 96)])
    assert line.startswith("pkd-offline: warning: 2 of 3 inputs have a padded side of 224 px or less")
    assert "96x800" in line and "\n" not in line
    for other in ({"name": "swin", "checkpoint_format": "pkd-offline"}, {"name": "swin", "random_init_seed": 0}):
        assert small_input_warning(other, [(96, 96)]) is None


def test_extract_warns_once_when_an_mmdetection_swin_teacher_meets_small_images(tmp_path, mmdet_state, synth_data,
                                                                                capsys):
    from stages.extract import ExtractConfig, extract

    checkpoint = save_mmdet(tmp_path / "swin.pth", mmdet_state)
    settings = dict(teacher="swin", data=synth_data, views=2, short_side=128, max_size=128, batch_size=4, workers=0,
                    levels="3,4", progress=False)
    extract(ExtractConfig(checkpoint=checkpoint, out=tmp_path / "mmdet.zarr", **settings))
    lines = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(lines) == 1 and "16 of 16 inputs have a padded side of 224 px or less" in lines[0], lines
    extract(ExtractConfig(random_init=True, variant="tiny", out=tmp_path / "own.zarr", **settings))
    assert "warning" not in capsys.readouterr().err
