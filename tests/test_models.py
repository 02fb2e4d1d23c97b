"""models.py: shapes, masking, patch layout, loss, checkpoint loading (official MAE key fixture), channel adaptation."""
import argparse
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from config import ConfigError
import models as M
import checkpoints as B

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = json.loads((ROOT / 'tests' / 'mae_vit_base_keys.json').read_text())
SIZES = dict(img_size=16, patch_size=4, embed_dim=32, depth=4, num_heads=2)  # L = 16 patches
DECODER = dict(decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    torch.set_num_threads(1)


def vit(in_chans=1, **kw):
    return M.VisionTransformer(**{**SIZES, 'in_chans': in_chans, **kw}).eval()


def mae(in_chans=1, norm_pix_loss=False, **kw):
    return M.MaskedAutoencoder(**{**SIZES, 'in_chans': in_chans, **DECODER, 'norm_pix_loss': norm_pix_loss,
                                  **kw}).eval()


def random_like(shapes):
    return {k: torch.randn(s) for k, s in shapes.items()}


# ---------------------------------------------------------------------------------------------------- position table

def test_sincos_table_layout():
    D, G = 8, 3
    table = M.get_2d_sincos_pos_embed(D, G, cls_token=True)
    assert table.shape == (1 + G * G, D) and not table[0].any()
    omega = [1.0, 1 / 100.0]  # 1 / 10000 ** (j / (D / 4)) for j = 0, 1

    def one_axis(pos):
        return [math.sin(pos * w) for w in omega] + [math.cos(pos * w) for w in omega]

    for i in range(G * G):
        row, col = divmod(i, G)  # raster order: first half of the channels is the column, second half the row
        assert table[1 + i].tolist() == pytest.approx(one_axis(col) + one_axis(row), abs=1e-6)


def test_pos_embed_fixed_and_in_state_dict():
    m = mae()
    for name in ('pos_embed', 'decoder_pos_embed'):
        p = getattr(m, name)
        assert not p.requires_grad and name in m.state_dict()
    grid = m.patch_embed.grid_size
    assert torch.equal(m.pos_embed[0], torch.from_numpy(M.get_2d_sincos_pos_embed(32, grid, cls_token=True)))


# ------------------------------------------------------------------------------------------------------------ shapes

def test_backbone_and_head_shapes():
    m, x = vit(), torch.randn(2, 1, 16, 16)
    assert m(x).shape == m.forward_features(x).shape == (2, 17, 32)
    feats = m.get_intermediate_layers(x, [3, 0])
    assert [f.shape for f in feats] == [(2, 16, 32)] * 2
    # the last block's output, before the final norm, is what forward_features normalises
    assert torch.allclose(m.norm(feats[0]), m.forward_features(x)[:, 1:], atol=1e-6)
    for pool in ('cls', 'mean'):
        assert M.TaskModel(m, M.ClassificationHead(32, 5, pool))(x).shape == (2, 5)


@pytest.mark.parametrize('patch_size, depth', [(4, 4), (8, 6), (16, 12)])
def test_segmentation_head_shapes(patch_size, depth):
    m = vit(in_chans=3, img_size=2 * patch_size, patch_size=patch_size, depth=depth)
    head = M.SegmentationHead(32, patch_size, 3, num_classes=4, depth=depth, channels=(16, 8, 4))
    assert len(head.block_ids) == 4 and head.block_ids[-1] == depth - 1
    assert head.block_ids == sorted(set(head.block_ids))
    x = torch.randn(2, 3, 2 * patch_size, 2 * patch_size)
    assert M.TaskModel(m, head)(x).shape == (2, 4, 2 * patch_size, 2 * patch_size)


def test_segmentation_head_rejects_bad_sizes():
    with pytest.raises(ConfigError, match='power-of-two patch size'):
        M.SegmentationHead(32, 14, 3, 2, depth=12)
    with pytest.raises(ConfigError, match='4 blocks'):
        M.SegmentationHead(32, 8, 3, 2, depth=3)


def test_mae_shapes_and_visible_tokens_only():
    m, x = mae(in_chans=3), torch.randn(2, 3, 16, 16)
    seen = []
    m.blocks[0].register_forward_pre_hook(lambda mod, args: seen.append(args[0].shape))
    loss, pred, mask = m(x, mask_ratio=0.75)
    assert loss.shape == () and pred.shape == (2, 16, 4 * 4 * 3) and mask.shape == (2, 16)
    assert seen == [(2, 1 + 4, 32)]  # cls + the 25% visible tokens, not all 16


def test_block_adapter_slots():
    class Zero(torch.nn.Module):
        def forward(self, x, y):
            return torch.zeros_like(y)

    blk, x = M.Block(32, 2).eval(), torch.randn(2, 5, 32)
    blk.adapter_attn = Zero()  # removes the attention branch
    assert torch.allclose(blk(x), x + blk.mlp(blk.norm2(x)))


# ----------------------------------------------------------------------------------------------------------- masking

@pytest.mark.parametrize('ratio', [0.75, 0.5, 0.6])
def test_random_masking(ratio):
    m = mae()
    B, L, D = 3, 16, 8
    x, noise = torch.randn(B, L, D), torch.rand(B, L)
    visible, mask, ids_restore = m.random_masking(x, ratio, noise)
    keep = int(L * (1 - ratio))
    assert visible.shape == (B, keep, D)
    assert mask.sum(1).tolist() == [L - keep] * B
    ids_shuffle = noise.argsort(1)
    assert torch.equal(ids_shuffle.gather(1, ids_restore), torch.arange(L).expand(B, L))  # restore inverts shuffle
    for b in range(B):  # the kept tokens are the ones of smallest noise, in that order, and mask 0 marks them
        kept = ids_shuffle[b, :keep]
        assert torch.equal(visible[b], x[b, kept])
        assert set(kept.tolist()) == set((mask[b] == 0).nonzero().flatten().tolist())


def test_fixed_noise_fixes_the_loss():
    m, x, noise = mae(), torch.randn(2, 1, 16, 16), torch.rand(2, 16)
    assert torch.equal(m(x, noise=noise)[0], m(x, noise=noise)[0])


# ------------------------------------------------------------------------------------------------- patches and loss

@pytest.mark.parametrize('in_chans', [1, 3])
def test_patchify_layout_and_roundtrip(in_chans):
    m, p = mae(in_chans=in_chans), 4
    imgs = torch.randn(2, in_chans, 16, 16)
    x = m.patchify(imgs)
    assert x.shape == (2, 16, p * p * in_chans)
    assert torch.equal(m.unpatchify(x), imgs)
    for i, j, r, c, ch in [(0, 0, 0, 0, 0), (1, 2, 3, 1, in_chans - 1), (3, 3, 2, 3, 0)]:
        # patch (i, j) in raster order; inside: row r, column c, channel ch fastest
        assert x[1, i * 4 + j, (r * p + c) * in_chans + ch] == imgs[1, ch, i * p + r, j * p + c]


@pytest.mark.parametrize('norm_pix_loss', [False, True])
def test_loss_by_hand(norm_pix_loss):
    m = M.MaskedAutoencoder(img_size=4, patch_size=2, in_chans=1, embed_dim=8, depth=1, num_heads=2,
                            decoder_embed_dim=8, decoder_depth=1, decoder_num_heads=2, norm_pix_loss=norm_pix_loss)
    imgs = torch.arange(16.0).reshape(1, 1, 4, 4) ** 1.5
    pred = torch.randn(1, 4, 4)
    mask = torch.tensor([[1.0, 0.0, 1.0, 1.0]])
    total, removed = 0.0, 0
    for i in range(2):
        for j in range(2):
            if mask[0, i * 2 + j] == 0:
                continue
            pix = [imgs[0, 0, 2 * i + r, 2 * j + c].item() for r in range(2) for c in range(2)]
            if norm_pix_loss:
                mean = sum(pix) / 4
                var = sum((v - mean) ** 2 for v in pix) / 3  # unbiased, as the official code
                pix = [(v - mean) / math.sqrt(var + 1e-6) for v in pix]
            total += sum((pred[0, i * 2 + j, k].item() - pix[k]) ** 2 for k in range(4)) / 4
            removed += 1
    assert m.forward_loss(imgs, pred, mask).item() == pytest.approx(total / removed, rel=1e-5)


def test_loss_is_float32_under_bf16_autocast():
    m, x = mae(), torch.randn(2, 1, 16, 16)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        loss, pred, _ = m(x)
    assert pred.dtype == torch.bfloat16 and loss.dtype == torch.float32


# ----------------------------------------------------------------------------------------- official checkpoint keys

def _on_meta(cls, **kw):
    """The model without its (slow, here useless) initialisation: shapes on 'meta', then empty CPU tensors."""
    with torch.device('meta'):
        model = cls(**kw)
    return model.to_empty(device='cpu')


def test_official_vit_base_encoder_keys_load():
    enc = {k: tuple(s) for k, s in FIXTURE['encoder'].items()}
    model = _on_meta(M.VisionTransformer, **M.vit_kwargs({'preset': 'vit_base'}))
    own = model.state_dict()
    assert list(own) == list(enc) and {k: tuple(v.shape) for k, v in own.items()} == enc  # 1:1, same order
    sd = random_like(enc)
    sd['head.weight'], sd['head.bias'] = torch.randn(1000, 768), torch.randn(1000)  # a timm classifier's head
    report = B.load_checkpoint(model, {'model': sd})
    assert 'loaded 150 tensors' in report and 'head.* (2)' in report
    assert torch.equal(model.blocks[11].mlp.fc2.weight, sd['blocks.11.mlp.fc2.weight'])


def test_official_mae_decoder_keys_load():
    shapes = {k: tuple(s) for part in ('encoder', 'decoder') for k, s in FIXTURE[part].items()}
    model = _on_meta(M.MaskedAutoencoder, **M.vit_kwargs({'preset': 'vit_base'}))  # official decoder 512/8/16
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == shapes
    assert {k for k in shapes if M.is_decoder_key(k)} == set(FIXTURE['decoder'])
    sd = random_like(shapes)
    report = B.load_checkpoint(model, {'model': sd})
    assert 'loaded 254 tensors' in report and '(encoder 150, decoder 104)' in report
    assert torch.equal(model.decoder_pred.weight, sd['decoder_pred.weight'])


# -------------------------------------------------------------------------------------------- loading and adapting

def test_vit_takes_smaller_square_images_with_its_position_table_resized():
    m = vit()                                                   # 16 px, 4x4 grid
    x = torch.randn(2, 1, 8, 8)                                 # DINO's local crop: a 2x2 grid
    table = F.interpolate(m.pos_embed[:, 1:].reshape(1, 4, 4, -1).permute(0, 3, 1, 2), size=(2, 2), mode='bicubic')
    expected = m.patch_embed.proj(x).flatten(2).transpose(1, 2) + table.flatten(2).transpose(1, 2)   # (B, 4, D)
    torch.testing.assert_close(m.embed_patches(x), expected)
    assert m.forward_features(x).shape == (2, 5, 32)
    full = torch.randn(2, 1, 16, 16)                            # its own size: the table as it is
    assert torch.equal(m.embed_patches(full), m.patch_embed(full) + m.pos_embed[:, 1:])
    with pytest.raises(ValueError, match='divisible by 4'):
        m(torch.randn(1, 1, 10, 10))


def test_pos_embed_interpolation():
    src = mae(img_size=16)  # 4x4 grid
    dst = mae(img_size=24)  # 6x6 grid
    report = B.load_checkpoint(dst, src.state_dict())
    assert dst.pos_embed.shape == (1, 37, 32) and dst.decoder_pos_embed.shape == (1, 37, 16)
    assert 'interpolated pos_embed 4x4->6x6, decoder_pos_embed 4x4->6x6' in report
    assert torch.equal(dst.pos_embed[:, 0], src.pos_embed[:, 0])  # cls row kept
    same = mae(img_size=16)
    assert 'interpolated' not in B.load_checkpoint(same, src.state_dict())
    assert torch.equal(same.pos_embed, src.pos_embed)


def test_three_to_one_channel_gives_the_same_output():
    rgb, grey = vit(in_chans=3), vit(in_chans=1)
    report = B.load_checkpoint(grey, {'model': rgb.state_dict()})
    assert 'patch_embed.proj.weight 3->1 channels' in report
    x = torch.randn(2, 1, 16, 16)
    torch.testing.assert_close(grey(x), rgb(x.repeat(1, 3, 1, 1)))


def test_one_to_three_channel_gives_the_same_output():
    grey, rgb = vit(in_chans=1), vit(in_chans=3)
    B.load_checkpoint(rgb, grey.state_dict())
    x = torch.randn(2, 1, 16, 16)
    torch.testing.assert_close(rgb(x.repeat(1, 3, 1, 1)), grey(x))


def test_mae_decoder_pred_channel_adaptation():
    rgb, grey = mae(in_chans=3), mae(in_chans=1)
    report = B.load_checkpoint(grey, rgb.state_dict())
    assert 'decoder_pred.weight 3->1 channels' in report
    x, noise = torch.randn(2, 1, 16, 16), torch.rand(2, 16)
    _, pred_grey, _ = grey(x, noise=noise)
    _, pred_rgb, _ = rgb(x.repeat(1, 3, 1, 1), noise=noise)
    torch.testing.assert_close(pred_grey, pred_rgb.reshape(2, 16, 16, 3).mean(-1))  # the grey value: channel mean


def test_missing_key_raises_naming_it():
    sd = vit().state_dict()
    del sd['blocks.2.attn.qkv.weight']
    with pytest.raises(B.CheckpointError, match=r'blocks\.2\.attn\.qkv\.weight \(96, 32\)'):
        B.load_checkpoint(vit(), sd)


def test_unadaptable_shape_raises_naming_both_shapes():
    sd = vit(embed_dim=64).state_dict()
    with pytest.raises(B.CheckpointError, match=r'cls_token: checkpoint shape \(1, 1, 64\).*\(1, 1, 32\)'):
        B.load_checkpoint(vit(), sd)
    sd = vit(patch_size=8).state_dict()
    with pytest.raises(B.CheckpointError, match=r'patch_embed\.proj\.weight.*\(32, 1, 8, 8\).*\(32, 1, 4, 4\)'):
        B.load_checkpoint(vit(), sd)


def test_foreign_key_inside_our_modules_raises():
    sd = vit().state_dict()
    sd['blocks.0.ls1.gamma'] = torch.ones(32)  # layer scale: a different block design, never silently dropped
    with pytest.raises(B.CheckpointError, match=r'blocks\.0\.ls1\.gamma'):
        B.load_checkpoint(vit(), sd)


def test_decoder_and_head_handling():
    full = mae()
    report = B.load_checkpoint(vit(), {'model': full.state_dict()})  # decoder into an encoder-only model
    assert 'ignored decoder (' in report
    report = B.load_checkpoint(mae(), vit().state_dict())  # encoder-only checkpoint into an MAE
    assert 'decoder kept as initialised' in report
    partial = full.state_dict()
    del partial['decoder_norm.bias']
    with pytest.raises(B.CheckpointError, match='decoder_norm.bias'):
        B.load_checkpoint(mae(), partial)


def test_frozen_decoder_needs_a_checkpoint_with_one():
    with pytest.raises(B.CheckpointError, match=r'no MAE decoder.*pretrain.train_decoder=true'):
        B.load_checkpoint(mae(), vit().state_dict(), need_decoder=True)     # a random decoder would stay frozen
    assert 'decoder (' not in B.load_checkpoint(mae(), mae().state_dict(), need_decoder=True)


@pytest.mark.parametrize('damage, message', [
    (lambda path: path.write_bytes(b''), 'cannot be read'),
    (lambda path: path.write_bytes(path.read_bytes()[:500]), 'cannot be read'),
    (lambda path: path.write_text('model: vit_base\n'), 'cannot be read'),
    (lambda path: torch.save({'model': {k: v * math.inf if k.endswith('fc1.weight') else v
                                        for k, v in vit().state_dict().items()}}, path), r'NaN or Inf in \[.*fc1'),
])
def test_damaged_backbone_checkpoint_is_named(tmp_path, damage, message):
    path = tmp_path / 'mae.pth'
    torch.save({'model': vit().state_dict()}, path)
    damage(path)
    with pytest.raises(B.CheckpointError, match=rf'{path}: .*{message}'):
        B.load_checkpoint(vit(), path)


def test_tpp_task_model_checkpoint_and_path(tmp_path):
    task = M.TaskModel(vit(), M.ClassificationHead(32, 3, pool='mean'))
    ddp = {'module.' + k: v for k, v in task.state_dict().items()}
    path = tmp_path / 'ckpt.pth'
    torch.save({'model': ddp, 'epoch': 3, 'args': argparse.Namespace(lr=1e-3)}, path)  # as MAE's training saves
    target = vit()
    report = B.load_checkpoint(target, path)
    assert report.startswith('loaded 54 tensors from ckpt.pth') and 'ignored head.* (4)' in report
    assert torch.equal(target.norm.weight, task.backbone.norm.weight)


def test_missing_key_is_named():
    sd = vit().state_dict()
    del sd['blocks.1.mlp.fc1.bias']
    with pytest.raises(B.CheckpointError, match=r'1 model keys missing.*blocks\.1\.mlp\.fc1\.bias'):
        B.load_checkpoint(vit(), sd)


def test_vit_kwargs_presets_and_overrides():
    assert M.vit_kwargs({'preset': 'vit_small', 'depth': None}) == dict(
        img_size=224, patch_size=16, in_chans=3, embed_dim=384, depth=12, num_heads=6, mlp_ratio=4.0)
    assert M.vit_kwargs({'preset': 'vit_large', 'img_size': 64, 'in_chans': 1})['embed_dim'] == 1024
    with pytest.raises(ConfigError, match=r'model\.num_heads'):
        M.vit_kwargs({'preset': None, 'img_size': 32, 'patch_size': 8, 'in_chans': 1, 'embed_dim': 32, 'depth': 2,
                      'num_heads': None, 'mlp_ratio': 4})


def test_builders_from_config():
    cfg = yaml.safe_load((ROOT / 'config.yaml').read_text())
    cfg['model'].update(embed_dim=32, num_heads=2, depth=4)  # smaller than the demo, same code path
    model, x = M.build_mae(cfg).eval(), torch.randn(2, 1, 64, 64)
    assert model.arch == M.build_backbone(cfg).arch and model.norm_pix_loss is True
    assert model(x)[1].shape == (2, 64, 64)
    for task, out in [('segmentation', (2, 3, 64, 64)), ('classification', (2, 3))]:
        cfg['finetune']['task'] = task
        head = M.build_head(cfg, num_classes=3)
        assert all(p.requires_grad for p in head.parameters())
        assert M.TaskModel(M.build_backbone(cfg).eval(), head.eval())(x).shape == out
