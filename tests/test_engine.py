"""Run plumbing: schedule, atomic checkpoints, run folders, the non-finite stop (the config: test_config.py)."""
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import config
import engine
import runs


def test_lr_warmup_then_cosine():
    lrs = [engine.lr_at(s, 100, 10, 1.0) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))           # monotone decay after warm-up
    assert engine.lr_at(55, 100, 10, 1.0) == pytest.approx(0.5)      # half-way through the cosine
    assert lrs[-1] < 0.001


def test_atomic_save_leaves_no_partial_file(tmp_path, monkeypatch):
    path = tmp_path / 'ckpt.pth'
    runs.atomic_save({'a': 1}, path)

    def crash(obj, f):
        f.write(b'half')
        raise OSError('disk full')
    monkeypatch.setattr(torch, 'save', crash)
    with pytest.raises(OSError):
        runs.atomic_save({'a': 2}, path)
    assert torch.load(path) == {'a': 1}                              # the old checkpoint is intact
    assert [p.name for p in tmp_path.iterdir()] == ['ckpt.pth']      # and the half-written one is gone


def tiny_run(tmp_path, name='run', resume=False, **run):
    cfg = config.load_config(config.REFERENCE_CONFIG, [f'run.out_dir={tmp_path}', 'run.log_every=1'] +
                             [f'run.{k}={v}' for k, v in run.items()])
    return runs.Run(cfg, name, resume)


def test_run_folder_is_made_when_training_starts_and_never_overwritten(tmp_path):
    run = tiny_run(tmp_path)
    assert not run.dir.exists()                                      # making a Run only checks
    run.start()
    assert (run.dir / 'config.yaml').is_file() and 'run folder' in (run.dir / 'log.txt').read_text()
    run.close()
    tiny_run(tmp_path).close()                 # no checkpoint yet (stopped before its first epoch ended): reused
    (run.dir / 'checkpoint.pth').write_bytes(b'')
    with pytest.raises(runs.RunFolderError, match='never overwritten.*--resume'):
        tiny_run(tmp_path)
    with pytest.raises(runs.RunFolderError, match="nothing to resume"):
        tiny_run(tmp_path, name='other', resume=True)
    (run.dir / 'targets.pth').write_bytes(b'')                       # the file a finished run writes last
    for resume in (False, True):
        with pytest.raises(runs.RunFolderError, match='finished'):
            runs.Run(run.cfg, 'run', resume, result='targets.pth')


def test_resume_refuses_changed_settings_before_writing_anything(tmp_path):
    run = tiny_run(tmp_path)
    run.start()
    run.close()
    (run.dir / 'checkpoint.pth').write_bytes(b'')
    saved = (run.dir / 'config.yaml').read_bytes()
    for key, value in [('peft.lora.r', 4), ('data.layout', 'synthetic_us'), ('model.depth', 3), ('backbone.checkpoint', 'x')]:
        cfg = config.load_config(config.REFERENCE_CONFIG, [f'run.out_dir={tmp_path}', f'{key}={value}'])
        with pytest.raises(config.ConfigError, match=rf'--resume: {key} differs'):
            runs.Run(cfg, 'run', resume=True)
    assert (run.dir / 'config.yaml').read_bytes() == saved


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


def test_non_finite_loss_before_any_checkpoint_says_so(tmp_path):
    run = tiny_run(tmp_path)
    ocfg = {'epochs': 1, 'lr': 1e-3, 'weight_decay': 0.0, 'warmup_epochs': 0, 'clip_grad': None}
    with pytest.raises(engine.NonFiniteLossError, match='no checkpoint yet') as err:
        engine.train(run, torch.nn.Linear(2, 1), engine.make_loader(run, Toy(), 4, train=True),
                     lambda net, batch: net(batch['image']).sum() * math.nan, ocfg)
    assert 'checkpoint.pth' not in str(err.value)


def test_best_pth_is_written_when_no_score_is_finite(tmp_path):
    run = tiny_run(tmp_path)
    ocfg = {'epochs': 2, 'lr': 1e-3, 'weight_decay': 0.0, 'warmup_epochs': 0, 'clip_grad': None}
    engine.train(run, torch.nn.Linear(2, 1), engine.make_loader(run, Toy(), 4, train=True),
                 lambda net, batch: net(batch['image']).pow(2).mean(), ocfg, evaluate=lambda m: {'score': math.nan})
    assert torch.load(run.dir / 'best.pth', weights_only=False)['epoch'] == 1   # the first epoch, so stage 2 ends


def test_resume_reads_the_checkpoint_on_the_cpu_and_restores_the_random_states(tmp_path, monkeypatch):
    ocfg = {'epochs': 2, 'lr': 1e-3, 'weight_decay': 0.0, 'warmup_epochs': 0, 'clip_grad': None}
    loss_fn = lambda net, batch: net(batch['image']).pow(2).mean()
    with tiny_run(tmp_path, workers=1) as run:
        engine.train(run, torch.nn.Linear(2, 1), engine.make_loader(run, Toy(), 4, train=True), loss_fn, ocfg)
    saved = torch.load(run.checkpoint, weights_only=False)['rng']
    load, where = torch.load, []

    def spy(*a, **kw):
        where.append(kw.get('map_location'))
        return load(*a, **kw)
    monkeypatch.setattr(torch, 'load', spy)
    run = tiny_run(tmp_path, resume=True, workers=1)
    loader = engine.make_loader(run, Toy(), 4, train=True)
    engine.train(run, torch.nn.Linear(2, 1), loader, loss_fn, dict(ocfg, epochs=2))
    assert where and set(where) == {'cpu'}     # RNG states stay CPU tensors: torch.set_rng_state refuses CUDA ones
    assert torch.equal(torch.get_rng_state(), saved['torch']) and torch.equal(loader.generator.get_state(),
                                                                               saved['loader'])
    assert 'not exact with run.workers > 0' in (run.dir / 'log.txt').read_text()


def test_amp_auto_uses_fp16_where_bf16_is_only_emulated(monkeypatch):
    monkeypatch.setattr(torch.cuda, 'is_bf16_supported', lambda including_emulation=True: including_emulation)
    assert runs._pick_amp('auto', torch.device('cuda', 0)) == torch.float16       # a V100 / T4


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


def test_frozen_after_stops_those_parameters_and_resume_goes_on_from_their_trained_values(tmp_path,
                                                                                          crash_after_checkpoint):
    """The mechanism of pretrain.decoder_warmup_steps: the given parameters train for n steps and never change after;
    the checkpoint keeps their trained values (not the ones the model was built with), so resume is exact."""
    ocfg = {'epochs': 2, 'lr': 1e-2, 'weight_decay': 0.05, 'warmup_epochs': 0, 'clip_grad': 1.0}
    loss_fn = lambda net, batch: (net(batch['image']) - 1).pow(2).mean()

    def train(name, resume=False, seen=None):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
        with tiny_run(tmp_path, name, resume) as run:
            engine.train(run, model, engine.make_loader(run, Toy(), 4, train=True), loss_fn, ocfg,
                         after_step=lambda m: seen.append([p.detach().clone() for p in m.parameters()])
                         if seen is not None else None, frozen_after=(1, list(model[1].parameters())))
        return model

    seen = []
    whole = train('whole', seen=seen)              # Toy: 8 items, batch 4: 2 steps per epoch, 4 in all
    assert len(seen) == 4
    for later in seen[1:]:
        assert torch.equal(later[2], seen[0][2]) and torch.equal(later[3], seen[0][3])   # frozen after step 1
        assert not torch.equal(later[0], seen[0][0])                                       # the rest still trains
    torch.manual_seed(0)
    assert not torch.equal(seen[0][2], torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))[1].weight)
    with crash_after_checkpoint():                 # stopped after epoch 1 (step 2: the second layer already frozen)
        train('resumed')
    resumed = train('resumed', resume=True)
    for a, b in zip(whole.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
