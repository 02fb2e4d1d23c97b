"""Run plumbing: config schema and overrides, schedule, atomic checkpoints, run folders, the non-finite stop."""
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml

import engine


def write(tmp_path, cfg, name='cfg.yaml'):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_partial_user_config_gets_reference_defaults(tmp_path):
    cfg = engine.load_config(write(tmp_path, {'pretrain': {'epochs': 3}}))
    reference = engine.load_config(engine.REFERENCE_CONFIG)
    assert cfg['pretrain']['epochs'] == 3
    assert cfg['finetune'] == reference['finetune']


@pytest.mark.parametrize('bad, message', [
    ({'pretrain': {'lrr': 1.0}}, r"unknown key 'pretrain.lrr'"),
    ({'optim': {'lr': 1.0}}, r"unknown key 'optim'"),
    ({'model': 3}, r"'model' must be a mapping"),
    ({'pretrain': {'epochs': 'ten'}}, r'pretrain.epochs: expected int'),
    ({'pretrain': {'lr': 'fast'}}, r'pretrain.lr: expected float'),
    ({'pretrain': {'train_decoder': 1}}, r'pretrain.train_decoder: expected bool'),
])
def test_bad_config_names_file_and_key(tmp_path, bad, message):
    path = write(tmp_path, bad)
    with pytest.raises(engine.ConfigError, match=message) as err:
        engine.load_config(path)
    assert str(path) in str(err.value)


def test_set_overrides_parse_yaml_and_are_checked():
    cfg = engine.load_config(engine.REFERENCE_CONFIG, ['pretrain.lr=1e-3', 'peft.lora.layers=[qkv, fc1]',
                                                       'backbone.checkpoint=/x/mae.pth', 'finetune.init=random'])
    assert cfg['pretrain']['lr'] == 1e-3                       # YAML reads 1e-3 as a string; float keys accept it
    assert cfg['peft']['lora']['layers'] == ['qkv', 'fc1']
    assert cfg['backbone']['checkpoint'] == '/x/mae.pth'
    with pytest.raises(engine.ConfigError, match=r"--set pretrain.lrr=1: unknown key 'pretrain.lrr'"):
        engine.load_config(engine.REFERENCE_CONFIG, ['pretrain.lrr=1'])
    with pytest.raises(engine.ConfigError, match='expected KEY=VALUE'):
        engine.load_config(engine.REFERENCE_CONFIG, ['pretrain.lr'])


def test_missing_config_file_is_named(tmp_path):
    with pytest.raises(engine.ConfigError, match='nope.yaml does not exist'):
        engine.load_config(tmp_path / 'nope.yaml')


def test_lr_warmup_then_cosine():
    lrs = [engine.lr_at(s, 100, 10, 1.0) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))           # monotone decay after warm-up
    assert engine.lr_at(55, 100, 10, 1.0) == pytest.approx(0.5)      # half-way through the cosine
    assert lrs[-1] < 0.001


def test_atomic_save_leaves_no_partial_file(tmp_path, monkeypatch):
    path = tmp_path / 'ckpt.pth'
    engine.atomic_save({'a': 1}, path)

    def crash(obj, f):
        open(f, 'wb').write(b'half')
        raise OSError('disk full')
    monkeypatch.setattr(torch, 'save', crash)
    with pytest.raises(OSError):
        engine.atomic_save({'a': 2}, path)
    assert torch.load(path) == {'a': 1}                              # the old checkpoint is intact


def tiny_run(tmp_path, name='run', resume=False, **run):
    cfg = engine.load_config(engine.REFERENCE_CONFIG, [f'run.out_dir={tmp_path}', 'run.log_every=1'] +
                             [f'run.{k}={v}' for k, v in run.items()])
    return engine.Run(cfg, name, resume)


def test_run_folder_is_never_overwritten(tmp_path):
    tiny_run(tmp_path).close()
    with pytest.raises(FileExistsError, match='never overwritten.*--resume'):
        tiny_run(tmp_path)
    with pytest.raises(FileNotFoundError, match='nothing to resume'):
        tiny_run(tmp_path, name='other', resume=True)


class Toy(torch.utils.data.Dataset):
    def __len__(self):
        return 8

    def __getitem__(self, i):
        return {'image': torch.full((2,), float(i))}


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    run = tiny_run(tmp_path)
    model = torch.nn.Linear(2, 1)
    loader = engine.make_loader(run, Toy(), 4, train=True)
    calls = []

    def loss_fn(net, batch):
        calls.append(1)
        loss = net(batch['image']).pow(2).mean()
        return loss * math.nan if len(calls) == 3 else loss    # the first step of epoch 2 goes wrong

    ocfg = {'epochs': 3, 'lr': 1e-3, 'weight_decay': 0.0, 'warmup_epochs': 0, 'clip_grad': None}
    with pytest.raises(engine.NonFiniteLossError, match=r'loss became nan in epoch 2, steps 3-3.*last good'):
        engine.train(run, model, loader, loss_fn, ocfg)
    ckpt = torch.load(run.checkpoint, weights_only=False)
    assert ckpt['epoch'] == 0 and all(math.isfinite(v.abs().sum()) for v in ckpt['model'].values())


class _RandomItems(torch.utils.data.Dataset):
    """Items drawn from torch's and numpy's global RNGs, as augmentations are (inside the loader workers)."""

    def __len__(self):
        return 8

    def __getitem__(self, i):
        return {'image': torch.rand(2), 'np': torch.tensor(np.random.rand(2))}


@pytest.mark.parametrize('workers', [0, 2])
def test_same_seed_gives_same_batches_with_workers(workers):
    def batches(seed):
        run = SimpleNamespace(cfg={'run': {'seed': seed, 'workers': workers}}, world=1, device=torch.device('cpu'))
        torch.manual_seed(seed)
        np.random.seed(seed)
        return [b for _ in range(2) for b in engine.make_loader(run, _RandomItems(), 4, train=True)]
    a, b, c = batches(0), batches(0), batches(1)
    assert all(torch.equal(x[k], y[k]) for x, y in zip(a, b) for k in x)
    assert not torch.equal(a[0]['image'], c[0]['image'])
    if workers:   # numpy is seeded per worker too: workers do not repeat each other's draws
        assert not torch.equal(a[0]['np'], a[1]['np'])
