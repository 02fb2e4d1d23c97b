"""Both stages under torchrun: 2 CPU processes (gloo) against one process, on the tiny config of test_stages.

One `python -m torch.distributed.run --nproc_per_node=2 tests/test_ddp.py CONFIG OUT` runs this file's __main__:
the backbone bootstrap, stage 1, and stage 2 for segmentation, classification and full segmentation fine-tuning.
Each stage runs unchanged except for three things that make one process comparable with two:
- training sees a fixed set of exactly one global batch (2 x B images, without augmentation) for 2 epochs, so
  2 optimiser steps;
- stage 1's MAE masking noise is a function of the image, not of the rank's random stream;
- each rank writes its first-step gradients and what it trained to a file, which this test compares.
The single-process runs do the same in this process, with the global batch 2B and the lr scaled for it by hand
(lr x 2, as torchrun's scaling does for 2 ranks).

Tolerance: the ranks must agree bit for bit. Two ranks against one process must agree to rtol 1e-4, atol 1e-6,
which allows for float32 sums taken in another order. In practice the gradients differ by <= 2e-8 and the targets
after 2 AdamW steps by <= 4e-9. The exception is entries whose exact gradient is 0 (the decoder's attention key
bias), which are left out: there AdamW divides rounding noise by |g| + eps. Test metrics must agree to 1e-6; in
practice they are identical.
Segmentation is compared only across ranks and in evaluation, not step against step. Its BatchNorm statistics and
its soft Dice loss come from each rank's batch, so two ranks of B are not one process of 2B.
"""
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch
import torch.distributed as dist

from config import load_config
import engine
import finetune
import lora
import pretrain_targets
from conftest import args, tiny_config

B = 8                                   # images per rank; a single process takes the global batch 2B
STAGES = ('pretrain', 'seg', 'cls', 'full')   # stage 1; stage 2: segmentation, classification, full segmentation
TOL = dict(rtol=1e-4, atol=1e-6)        # float32 sums in another order (2 half batches, then an all-reduce)
ROUNDING = 1e-8                         # AdamW's eps: a gradient below it is rounding noise that AdamW amplifies
ROOT = Path(__file__).resolve().parents[1]


def overrides(stage, world, runs):
    """--set list of one stage run by `world` processes, all with the global batch 2B and the same effective lr."""
    name = f'{stage}-{world}proc'
    batch, lr_scale = f'batch_size={2 * B // world}', 2 // world    # engine scales the config lr by the world size
    if stage == 'pretrain':
        return [f'pretrain.name={name}', f'pretrain.{batch}', f'pretrain.lr={1e-3 * lr_scale}']
    task = 'classification' if stage == 'cls' else 'segmentation'
    init = 'full' if stage == 'full' else 'tpp'    # full: every parameter the segmentation forward uses trains
    return [f'finetune.name={name}', f'finetune.{batch}', f'finetune.lr={3e-3 * lr_scale}', f'finetune.task={task}',
            f'finetune.init={init}', f'finetune.targets={runs}/pretrain-2proc/targets.pth']   # same start for all


def fixed_noise_mae_loss(mask_ratio, num_patches):
    """Stage 1's loss with the masking noise of each image seeded by its (case, slice), whatever rank it is on."""
    def loss_fn(net, batch):
        noise = torch.stack([torch.rand(num_patches, generator=torch.Generator().manual_seed(1000 * c + s))
                             for c, s in zip(batch['case'].tolist(), batch['slice'].tolist())])
        return net(batch['image'], mask_ratio, noise=noise.to(batch['image'].device))[0]
    return loss_fn


@contextlib.contextmanager
def comparable_training(dump):
    """Patch engine.train: one fixed global batch, no augmentation, fixed MAE noise; write each rank's first-step
    gradients (before clipping) and trained state to dump-rank<r>.pt."""
    train, clip = engine.train, torch.nn.utils.clip_grad_norm_
    seen = {}

    def first_grads(params, *a, **k):
        if 'grads' not in seen:
            seen['grads'] = {n: p.grad.clone() for n, p in seen['model'].named_parameters() if p.grad is not None}
        return clip(params, *a, **k)

    def fixed_train(run, model, loader, loss_fn, ocfg, **kw):
        if kw.get('tag') == 'bootstrap':
            return train(run, model, loader, loss_fn, ocfg, **kw)
        dataset = loader.dataset
        dataset.train = False                                            # no augmentation
        step = len(dataset) // (2 * B)
        fixed = torch.utils.data.Subset(dataset, range(0, step * 2 * B, step))   # spread over the cases
        loader = engine.make_loader(run, fixed, ocfg['batch_size'], train=True)
        if kw['tag'] == 'pretrain':
            loss_fn = fixed_noise_mae_loss(run.cfg['pretrain']['mask_ratio'], model.patch_embed.num_patches)
        seen['model'] = model
        result = train(run, model, loader, loss_fn, ocfg, **kw)
        trained = {n for n, p in model.named_parameters() if p.requires_grad}
        torch.save({'state': engine.trainable_state(model, trained), 'targets': lora.target_state_dict(model),
                    'grads': seen['grads'], 'history': result['history']}, f'{dump}-rank{run.rank}.pt')
        return result

    with mock.patch.object(engine, 'train', fixed_train), mock.patch.object(torch.nn.utils, 'clip_grad_norm_',
                                                                            first_grads):
        yield


def run_stages(config, out, world, stages=STAGES):
    runs = load_config(config)['run']['out_dir']
    for stage in stages:
        with comparable_training(f'{out}/{stage}-{world}proc'):
            script = pretrain_targets if stage == 'pretrain' else finetune
            script.main(args(config, *overrides(stage, world, runs)))


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


@pytest.fixture(scope='module')
def two_ranks(tmp_path_factory):
    """Every stage under torchrun with 2 processes; a fresh cache, so the bootstrap runs under torchrun too."""
    tmp = tmp_path_factory.mktemp('ddp')
    config = tiny_config(tmp, tmp / 'cache', pretrain={'epochs': 2, 'warmup_epochs': 0},
                         finetune={'epochs': 2, 'warmup_epochs': 0}, run={'device': 'cpu'})
    out = tmp / 'dumps'
    out.mkdir()
    env = {**os.environ, 'PYTHONPATH': os.pathsep.join([str(ROOT), os.environ.get('PYTHONPATH', '')]),
           'OMP_NUM_THREADS': '1'}
    env.pop('WORLD_SIZE', None)
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2', '--master_addr=127.0.0.1',
           f'--master_port={free_port()}', __file__, str(config), str(out)]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return config, out, proc.stdout


def load(out, stage, world, rank=0):
    return torch.load(out / f'{stage}-{world}proc-rank{rank}.pt', weights_only=False)


def assert_equal(a, b):
    assert a.keys() == b.keys()
    assert [k for k in a if not torch.equal(a[k], b[k])] == []


def assert_close(a, b, skip=None):
    assert a.keys() == b.keys()
    for k in a:
        keep = ~skip[k] if skip and k in skip else ...
        torch.testing.assert_close(a[k][keep], b[k][keep], **TOL, msg=lambda m: f'{k}: {m}')


@pytest.mark.parametrize('stage', STAGES)
def test_every_rank_ends_with_the_same_state(two_ranks, stage):
    config, out, _ = two_ranks
    r0, r1 = load(out, stage, 2, 0), load(out, stage, 2, 1)
    assert_equal(r0['grads'], r1['grads'])
    assert_equal(r0['state'], r1['state'])   # targets, heads, decoder, and BatchNorm statistics (segmentation)
    runs = Path(load_config(config)['run']['out_dir'])
    if stage == 'pretrain':
        saved = torch.load(runs / 'pretrain-2proc' / 'targets.pth', weights_only=True)['targets']
        assert_equal(saved, r0['targets'])
        assert r0['targets'] and any(r0['grads'][k].abs().sum() > 0 for k in r0['targets'])


@pytest.mark.parametrize('stage', ['pretrain', 'cls'])
def test_two_ranks_step_as_one_process_on_the_global_batch(two_ranks, stage):
    config, out, _ = two_ranks
    run_stages(config, out, 1, [stage])
    assert not dist.is_initialized()          # a plain run never touches torch.distributed
    ddp, single = load(out, stage, 2), load(out, stage, 1)
    assert_close(ddp['grads'], single['grads'])          # first step: all-reduced mean == global-batch mean
    assert_close(ddp['targets'], single['targets'])      # after 2 steps (lr, clipping, AdamW)
    # The rest of what trained (MAE decoder, task head) too, except the entries whose exact gradient is 0 (the
    # decoder's attention key bias: softmax ignores it): AdamW divides their ~1e-10 rounding noise by |g| + eps.
    noise = {k: g.abs() < ROUNDING for k, g in single['grads'].items()}
    assert_close(ddp['state'], single['state'], skip=noise)
    for a, b in zip(ddp['history'], single['history']):  # logged loss: the mean over ranks == the global mean
        assert a['train_loss'] == pytest.approx(b['train_loss'], rel=1e-5)


@pytest.mark.parametrize('stage', ['seg', 'cls'])
def test_evaluation_over_ranks_equals_one_process(two_ranks, stage, tmp_path):
    """Test metrics (Dice per volume, AUC over cases) of the torchrun run == one process evaluating its best.pth."""
    config, out, _ = two_ranks
    runs = Path(load_config(config)['run']['out_dir'])
    best = runs / f'{stage}-2proc' / 'best.pth'

    def reuse_best(run, *a, **k):                       # no training: evaluate the torchrun run's checkpoint
        run.start()                                     # (what train does first: make the run folder)
        shutil.copy(best, run.dir / 'best.pth')
        return {'steps': 0, 'best': None, 'history': []}
    with mock.patch.object(engine, 'train', reuse_best):
        single = finetune.main(args(config, *overrides(stage, 1, runs), f'finetune.name={stage}-eval'))
    ddp_test = json.loads((runs / f'{stage}-2proc' / 'metrics.json').read_text())['test']
    single_test = json.loads((single / 'metrics.json').read_text())['test']
    assert ddp_test.keys() == single_test.keys()
    for k in ddp_test:
        assert ddp_test[k] == pytest.approx(single_test[k], abs=1e-6), k


def test_rank0_alone_writes_the_run(two_ranks):
    config, _, stdout = two_ranks
    runs = Path(load_config(config)['run']['out_dir'])
    log = (runs / 'pretrain-2proc' / 'log.txt').read_text()
    assert 'processes 2' in log and log.count('run folder') == 1
    assert stdout.count('run folder') == 1 + len(STAGES)       # bootstrap + each stage, printed once (rank 0)
    assert len(list((runs / 'pretrain-2proc' / 'tensorboard').iterdir())) == 1


if __name__ == '__main__':      # under torchrun: python -m torch.distributed.run ... tests/test_ddp.py CONFIG OUT
    run_stages(sys.argv[1], sys.argv[2], int(os.environ['WORLD_SIZE']))
