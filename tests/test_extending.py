"""docs/extending.md, done once each: a toy target, a toy pretext and a toy data layout, built as the page says, go
through the project's own machinery (freezing, saving and loading by type; engine.train; data.prepare), so the page
cannot go stale."""
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

import config
import data
import engine
import lora
import models
import runs
from conftest import tiny_config


class Gain(lora.Target):
    """A toy PEFT target: a learned per-channel gain on a block's MLP output, y * (1 + g); g = 0 at the start."""

    def __init__(self, dim):
        super().__init__()
        self.g = nn.Parameter(torch.zeros(dim))

    def forward(self, x, y):                                          # the Block slot's call: adapter(x, y) -> y'
        return y * (1 + self.g)


def inject_gain(vit):
    for blk in vit.blocks:                                            # the encoder only, never the MAE decoder
        blk.adapter_mlp = Gain(blk.norm1.normalized_shape[0])


def tiny(tmp_path, cache, *overrides):
    return config.load_config(tiny_config(tmp_path, cache, pretrain={'epochs': 1}), list(overrides))


def test_a_new_target_is_frozen_saved_and_loaded_by_its_type(tmp_path, cache):
    cfg = tiny(tmp_path, cache)
    torch.manual_seed(0)
    vit, x = models.build_backbone(cfg), torch.randn(2, 1, 32, 32)
    before, fingerprint = vit(x), lora.backbone_fingerprint(vit)
    inject_gain(vit)
    assert torch.equal(vit(x), before) and lora.backbone_fingerprint(vit) == fingerprint   # starts as the backbone
    lora.mark_trainable(vit)
    trainable = {n for n, p in vit.named_parameters() if p.requires_grad}
    assert trainable == {f'blocks.{i}.adapter_mlp.g' for i in range(4)} == set(lora.target_state_dict(vit))
    with torch.no_grad():
        vit.blocks[0].adapter_mlp.g += 0.5                            # "trained"
    again = models.build_backbone(cfg)
    again.load_state_dict(vit.state_dict(), strict=False)             # the same backbone
    inject_gain(again)
    lora.load_target_state_dict(again, lora.target_state_dict(vit))
    assert torch.equal(again(x), vit(x)) and not torch.equal(vit(x), before)


def test_a_new_pretext_trains_only_the_targets_and_its_head(tmp_path, cache):
    cfg = tiny(tmp_path, cache)
    cases, info = data.prepare(cfg['data'], cache, in_chans=cfg['model']['in_chans'])
    cfg['data']['intensity'], cfg['model']['in_chans'] = info['modes'], info['in_chans']   # as the stages do
    dataset = data.SliceDataset(data.split_cases(cases, cfg['data'])['train'], cfg['data'], 32, 1, None, train=True)
    run = runs.Run(cfg, 'toy-pretext')                              # seeds the run
    backbone = models.build_backbone(cfg)
    model = models.TaskModel(backbone, nn.Linear(backbone.embed_dim, 1))     # the pretext's head: cls -> image mean
    lora.inject(backbone, cfg['peft'])
    lora.mark_trainable(model, extra=model.head.parameters())
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    start = lora.target_state_dict(backbone)
    loss_fn = lambda net, batch: F.mse_loss(net.head(net.backbone(batch['image'])[:, 0]).squeeze(1),
                                            batch['image'].mean((1, 2, 3)))
    loader = engine.make_loader(run, dataset, cfg['pretrain']['batch_size'], train=True)
    result = engine.train(run, model, loader, loss_fn, cfg['pretrain'], tag='pretrain')
    run.close()
    assert result['steps'] > 0 and all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    targets = lora.target_state_dict(backbone)
    assert any(not torch.equal(targets[k], start[k]) for k in targets)   # B moved off zero: the targets trained
    path = tmp_path / 'targets.pth'                                   # stage 2 reads them as stage 1's
    meta = {'arch': backbone.arch, 'peft': lora.structure(backbone), 'backbone': lora.backbone_fingerprint(backbone)}
    torch.save({'targets': targets, 'meta': meta}, path)
    fresh = models.build_backbone(cfg)
    fresh.load_state_dict({k: v for k, v in backbone.state_dict().items() if '.lora.' not in k}, strict=False)
    lora.inject(fresh, cfg['peft'])
    lora.load_targets(path, fresh, {**meta, 'backbone': lora.backbone_fingerprint(fresh)})


def read_pairs(root, dcfg):
    """A toy layout: root/<id>.png with its class index in root/<id>.txt."""
    cases = [data.Case(p.stem, p, None, int(p.with_suffix('.txt').read_text())) for p in sorted(root.glob('*.png'))]
    return cases, {'class_names': None, 'label_names': None}


def test_a_new_layout_reads_through_prepare_split_and_slices(tmp_path, cache, monkeypatch):
    root = tmp_path / 'pairs'
    root.mkdir()
    rng = np.random.default_rng(0)
    for i in range(12):
        Image.fromarray(rng.integers(0, 255, (40, 40), dtype=np.uint8)).save(root / f'img{i}.png')
        (root / f'img{i}.txt').write_text(str(i % 2))
    monkeypatch.setitem(config.SCHEMA, 'data.layout', config.Choice(*config.LAYOUTS, 'pairs'))
    monkeypatch.setitem(data.READERS, 'pairs', read_pairs)
    cfg = tiny(tmp_path, cache, 'data.layout=pairs', f'data.root={root}')
    cases, info = data.prepare(cfg['data'], cache, 'classification', cfg['model']['in_chans'])
    assert len(cases) == 12 and info['num_classes_cls'] == 2 and info['in_chans'] == 1
    cfg['data']['intensity'] = info['modes']                          # as the stages do
    splits = data.split_cases(cases, cfg['data'])
    item = data.SliceDataset(splits['train'], cfg['data'], 32, 1, 'classification', train=True)[0]
    assert item['image'].shape == (1, 32, 32) and item['label'] in (0, 1)
