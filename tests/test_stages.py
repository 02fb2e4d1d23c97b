"""Both stages end to end on a tiny config: the backbone never changes in stage 1, the targets file holds only the
targets, stage 2 loads them and learns, and an interrupted run resumes exactly."""
import argparse
import json

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml

import data
import engine
import finetune
import lora
import models
import pretrain_targets


@pytest.fixture(scope='module')
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp('cache')        # synthetic data and the bootstrapped backbone, made once


def tiny_config(tmp_path, cache, **sections):
    cfg = {
        'run': {'out_dir': str(tmp_path / 'runs'), 'cache_dir': str(cache), 'log_every': 5},
        'model': {'preset': None, 'img_size': 32, 'patch_size': 8, 'embed_dim': 32, 'depth': 4, 'num_heads': 2,
                  'mlp_ratio': 2.0},
        'mae': {'decoder_embed_dim': 16, 'decoder_depth': 1, 'decoder_num_heads': 2},
        'backbone': {'bootstrap': {'images': 64, 'epochs': 1, 'batch_size': 16}},
        'peft': {'lora': {'r': 2}},
        'pretrain': {'epochs': 2, 'batch_size': 32},
        'finetune': {'epochs': 3, 'batch_size': 32, 'seg_channels': [16, 8, 8], 'lr': 3e-3},
    }
    for section, values in sections.items():
        cfg[section].update(values)
    path = tmp_path / 'tiny.yaml'
    path.write_text(yaml.safe_dump(cfg))
    return path


def args(path, *overrides, resume=False):
    return argparse.Namespace(config=str(path), set=list(overrides), resume=resume)


def test_stage1_freezes_backbone_and_saves_only_targets(tmp_path, cache, monkeypatch):
    seen = {}
    train_mae = pretrain_targets.train_mae

    def spy(run, mae, dataset, ocfg, mask_ratio, tag):   # snapshot the frozen backbone before stage-1 training
        if tag == 'pretrain':
            seen['mae'], seen['before'] = mae, {n: p.detach().clone() for n, p in mae.named_parameters()
                                                if not p.requires_grad}
        return train_mae(run, mae, dataset, ocfg, mask_ratio, tag)
    monkeypatch.setattr(pretrain_targets, 'train_mae', spy)
    path = pretrain_targets.main(args(tiny_config(tmp_path, cache)))

    mae, before = seen['mae'], seen['before']
    targets = {n for n, _ in lora.target_parameters(mae)}
    encoder = {n for n, _ in mae.named_parameters() if not models.is_decoder_key(n)}
    assert encoder - targets <= set(before)                               # every backbone tensor was frozen ...
    for n, p in mae.named_parameters():
        if n in before:
            assert torch.equal(p, before[n]), n                            # ... and is bit-identical after stage 1
    saved = torch.load(path, weights_only=True)
    assert set(saved['targets']) == targets                                # only target keys
    backbone_file = pretrain_targets.pretrained_backbone(engine.load_config(tmp_path / 'tiny.yaml'))
    assert path.stat().st_size < 0.25 * backbone_file.stat().st_size
    assert saved['meta']['steps'] > 0 and saved['meta']['backbone'] == lora.backbone_fingerprint(mae)
    assert (path.parent / 'reconstructions.png').stat().st_size > 0


@pytest.mark.parametrize('task', ['segmentation', 'classification'])
def test_stage2_loads_targets_and_learns(tmp_path, cache, task):
    cfg = tiny_config(tmp_path, cache)
    pretrain_targets.main(args(cfg))
    run_dir = finetune.main(args(cfg, f'finetune.task={task}'))
    metrics = json.loads((run_dir / 'metrics.json').read_text())
    losses = [h['train_loss'] for h in metrics['history']]
    assert losses[-1] < losses[0], losses
    assert metrics['init'] == 'tpp' and 'targets: loaded' in (run_dir / 'log.txt').read_text()
    assert 0 <= metrics['test']['score'] <= 1
    model = torch.load(run_dir / 'model.pth', weights_only=False)
    assert model['lora_merged'] and not any('.lora.' in k for k in model['model'])


def test_stage2_saves_predicted_masks_on_the_source_grid(tmp_path, cache):
    cfg = tiny_config(tmp_path, cache, finetune={'epochs': 1, 'save_predictions': True})
    run_dir = finetune.main(args(cfg, 'finetune.init=linear'))
    saved = sorted((run_dir / 'predictions').glob('*_pred.nii.gz'))
    dcfg = engine.load_config(cfg)['data']
    cases = data.split_cases(data.prepare(dcfg, str(cache))[0], dcfg)['test']
    test_ids = {c.id for c in cases}
    assert {p.name[:-len('_pred.nii.gz')] for p in saved} == test_ids
    case = next(c for c in cases if c.id == saved[0].name[:-len('_pred.nii.gz')])
    source, pred = nib.as_closest_canonical(nib.load(case.image)), nib.load(saved[0])
    assert pred.shape == source.shape and np.allclose(pred.affine, source.affine)
    assert set(np.unique(np.asarray(pred.dataobj))) <= {0, 1, 2}
    assert (run_dir / 'predictions' / 'overlay.png').stat().st_size > 0


def test_stage2_refuses_targets_of_another_rank(tmp_path, cache):
    cfg = tiny_config(tmp_path, cache)
    pretrain_targets.main(args(cfg))
    with pytest.raises(lora.TargetMismatchError, match=r'peft'):
        finetune.main(args(cfg, 'peft.lora.r=4'))


@pytest.mark.parametrize('script, name', [(pretrain_targets, 'pretrain'), (finetune, 'finetune')])
def test_interrupted_run_resumes_exactly(tmp_path, cache, crash_after_checkpoint, script, name):
    cfg = tiny_config(tmp_path, cache, finetune={'epochs': 2, 'name': 'ft'})
    if script is finetune:
        pretrain_targets.main(args(cfg))
    straight = script.main(args(cfg, f'{name}.name=straight'))
    with crash_after_checkpoint():
        script.main(args(cfg, f'{name}.name=crashed'))
    resumed = script.main(args(cfg, f'{name}.name=crashed', resume=True))
    if script is pretrain_targets:
        a, b = (torch.load(p, weights_only=True)['targets'] for p in (straight, resumed))
    else:
        a, b = (torch.load(p / 'best.pth', weights_only=False)['model'] for p in (straight, resumed))
        ma, mb = (json.loads((p / 'metrics.json').read_text()) for p in (straight, resumed))
        assert ma['test'] == mb['test'] and ma['history'] == mb['history']
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
