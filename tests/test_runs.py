"""Run folders are safe: one process at a time (the lock), nothing tpp did not write is touched, names stay inside
run.out_dir, the file that makes a run finished is written last, and damaged files or a full disk say what to do."""
import errno
import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import config
import data
import engine
import finetune
import pretrain_backbone
import pretrain_targets
import runs
from conftest import args, tiny_config


def make_run(out_dir, name='run', resume=False, **kw):
    cfg = config.load_config(config.REFERENCE_CONFIG, [f'run.out_dir={out_dir}', 'run.log_every=1'])
    return runs.Run(cfg, name, resume, **kw)


class Toy(torch.utils.data.Dataset):
    def __len__(self):
        return 8

    def __getitem__(self, i):
        return {'image': torch.full((2,), float(i))}


OCFG = {'epochs': 2, 'lr': 1e-3, 'weight_decay': 0.0, 'warmup_epochs': 0, 'clip_grad': None}


def train_toy(run):
    engine.train(run, torch.nn.Linear(2, 1), engine.make_loader(run, Toy(), 4, train=True),
                 lambda net, batch: net(batch['image']).pow(2).mean(), OCFG)


# ----------------------------------------------------------------------------------------------------------------------
# The lock

HOLD = textwrap.dedent('''
    import sys
    sys.path.insert(0, sys.argv[1])
    import config, runs
    cfg = config.load_config(config.REFERENCE_CONFIG, [f'run.out_dir={sys.argv[2]}'])
    with runs.Run(cfg, 'run') as run:
        run.start()
        print('holding', flush=True)
        sys.stdin.readline()
''')


def test_a_second_process_with_the_same_name_refuses_before_writing_anything(tmp_path):
    root = Path(__file__).resolve().parents[1]
    other = subprocess.Popen([sys.executable, '-c', HOLD, str(root), str(tmp_path)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True, env={**os.environ, 'OMP_NUM_THREADS': '1'})
    try:
        assert 'holding\n' in iter(other.stdout.readline, '')   # the other process has taken the folder
        folder = tmp_path / 'run'
        before = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
        with pytest.raises(runs.RunFolderError, match=rf'{folder} is in use by process {other.pid} '):
            make_run(tmp_path)
        assert {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()} == before
    finally:
        other.communicate('\n', timeout=60)
    assert other.returncode == 0 and not (tmp_path / 'run' / runs.LOCK).exists()   # released at its end
    with make_run(tmp_path) as run:                                                      # and free again
        run.start()


def test_of_two_runs_started_at_once_only_one_takes_the_folder(tmp_path):
    first, second = make_run(tmp_path), make_run(tmp_path)     # both pass the checks made before anything is written
    first.start()
    with pytest.raises(runs.RunFolderError, match=rf'in use by process {os.getpid()} on {socket.gethostname()}'):
        second.start()
    first.close()
    assert not (first.dir / runs.LOCK).exists()


def test_a_stale_lock_is_reported_and_taken_over_a_live_one_on_another_host_is_not(tmp_path):
    with make_run(tmp_path) as run:
        run.start()
    gone = subprocess.Popen(['true'])
    gone.wait()                                                 # a process that has ended: its pid is free
    lock = tmp_path / 'run' / runs.LOCK
    lock.write_text(f'{gone.pid} {socket.gethostname()}\n')
    with make_run(tmp_path) as run:
        run.start()
        assert lock.read_text() == f'{os.getpid()} {socket.gethostname()}\n'
    assert f'stale lock of process {gone.pid} ' in (run.dir / 'log.txt').read_text() and not lock.exists()
    lock.write_text(f'{gone.pid} another-host\n')               # its process cannot be checked from here
    with pytest.raises(runs.RunFolderError, match=f'in use by process {gone.pid} on another-host'):
        make_run(tmp_path)


def test_the_lock_is_released_on_an_error_and_ctrl_c_says_how_to_continue(tmp_path, crash_after_checkpoint):
    with crash_after_checkpoint():
        with make_run(tmp_path) as run:
            train_toy(run)
    log = (run.dir / 'log.txt').read_text()
    assert f'interrupted: the same command with --resume continues the run from {run.checkpoint}' in log and not (run.dir / runs.LOCK).exists()
    with pytest.raises(RuntimeError, match='boom'):
        with make_run(tmp_path, 'other') as run:
            run.start()
            raise RuntimeError('boom')
    assert not (run.dir / runs.LOCK).exists()
    with make_run(tmp_path, resume=True) as run:                # the interrupted run continues
        train_toy(run)
    assert torch.load(run.checkpoint, weights_only=False)['epoch'] == OCFG['epochs'] - 1


def test_ctrl_c_at_the_command_line_exits_130_without_a_traceback(monkeypatch, capsys):
    monkeypatch.setattr(sys, 'argv', ['finetune.py'])
    monkeypatch.delenv('TPP_DEBUG', raising=False)
    with pytest.raises(SystemExit) as end:
        runs.cli(lambda a: (_ for _ in ()).throw(KeyboardInterrupt()), 'doc')
    assert end.value.code == 130 and capsys.readouterr().err == ''


# ----------------------------------------------------------------------------------------------------------------------
# Nothing tpp did not write

def test_a_folder_tpp_did_not_make_is_never_written(tmp_path):
    mine = tmp_path / 'run'
    mine.mkdir()
    (mine / 'config.yaml').write_text('my: notes\n')
    for resume in (False, True):
        with pytest.raises(runs.RunFolderError, match=rf'{mine} exists and is not a tpp run folder.*another name'):
            make_run(tmp_path, resume=resume)
    (tmp_path / 'file').write_text('mine')
    with pytest.raises(runs.RunFolderError, match='not a tpp run folder'):
        make_run(tmp_path, 'file')
    assert (mine / 'config.yaml').read_text() == 'my: notes\n' and os.listdir(mine) == ['config.yaml']
    (tmp_path / 'empty').mkdir()                                # an empty folder is taken
    with make_run(tmp_path, 'empty') as run:
        run.start()
    assert (run.dir / runs.MARKER).read_text() == 'run\n'


def test_stage2_never_writes_into_the_stage1_folder(tmp_path, cache, crash_after_checkpoint):
    cfg = tiny_config(tmp_path, cache, pretrain={'epochs': 1})
    pretrain_backbone.resolve(config.load_config(cfg))          # stage 0 first (cached): the crash is stage 1's
    with crash_after_checkpoint():                              # a stage-1 folder with a checkpoint: "pass --resume"
        pretrain_targets.main(args(cfg))
    folder = tmp_path / 'runs' / 'pretrain'
    saved = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
    for resume in (False, True):
        with pytest.raises(runs.RunFolderError, match=rf'{folder} is a pretrain run folder and a finetune run never '
                                                        r'writes into it: choose another name \(--set finetune.name'):
            finetune.main(args(cfg, 'finetune.name=pretrain', 'finetune.init=random', resume=resume))
    assert {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()} == saved


@pytest.mark.parametrize('script, override', [
    (pretrain_targets, 'pretrain.name=""'), (pretrain_targets, 'pretrain.name=.'), (pretrain_targets, 'pretrain.name=a/b'),
    (finetune, 'finetune.name=""'), (finetune, 'finetune.name=..'), (finetune, 'finetune.name=a/b'),
    (finetune, 'finetune.name=/tmp/x'), (finetune, 'finetune.name=123'),
])
def test_empty_or_path_like_names_are_refused_before_anything_runs(tmp_path, cache, monkeypatch, script, override):
    monkeypatch.setattr(data, 'prepare', lambda *a, **kw: pytest.fail('the data was read before the name was checked'))
    key = override.split('=')[0]
    with pytest.raises(config.ConfigError, match=rf'{key} must be (null or )?a plain folder name'):
        script.main(args(tiny_config(tmp_path, cache), override))
    assert not (tmp_path / 'runs').exists()


# ----------------------------------------------------------------------------------------------------------------------
# Finished = the last file written

def test_metrics_json_is_written_last_and_resume_finishes_a_run_it_is_missing_from(tmp_path, cache, monkeypatch):
    cfg = tiny_config(tmp_path, cache, finetune={'epochs': 1, 'name': 'ft'})
    stage2 = ['finetune.init=random', 'finetune.task=classification']
    write, lost = runs.atomic_write, []

    def disk_full_at_metrics(text, path):
        if path.name == 'metrics.json':
            lost.append(json.loads(text))
            raise runs.RunFolderError('disk full (simulated)')
        write(text, path)
    with monkeypatch.context() as m:
        m.setattr(runs, 'atomic_write', disk_full_at_metrics)
        with pytest.raises(runs.RunFolderError, match='simulated'):
            finetune.main(args(cfg, *stage2))
    folder = tmp_path / 'runs' / 'ft'
    assert (folder / 'model.pth').is_file() and not (folder / 'metrics.json').exists()   # not finished
    assert not (folder / runs.LOCK).exists()
    with pytest.raises(runs.RunFolderError, match='pass --resume'):
        finetune.main(args(cfg, *stage2))
    assert finetune.main(args(cfg, *stage2, resume=True)) == folder                       # training was complete
    metrics = json.loads((folder / 'metrics.json').read_text())
    assert metrics['test'] == lost[0]['test'] and metrics['history'] == lost[0]['history']


def test_targets_pth_is_written_last_and_resume_finishes_the_run(tmp_path, cache, monkeypatch):
    cfg = tiny_config(tmp_path, cache, pretrain={'epochs': 1})
    with monkeypatch.context() as m:
        m.setattr(pretrain_targets, 'save_reconstructions', lambda *a: (_ for _ in ()).throw(OSError('no PNG')))
        with pytest.raises(OSError, match='no PNG'):
            pretrain_targets.main(args(cfg))
    assert not (tmp_path / 'runs' / 'pretrain' / 'targets.pth').exists()
    path = pretrain_targets.main(args(cfg, resume=True))
    assert (path.parent / 'reconstructions.png').is_file() and torch.load(path, weights_only=True)['meta']['steps'] > 0


# ----------------------------------------------------------------------------------------------------------------------
# Damaged files, full disks

@pytest.mark.parametrize('damage', ['truncated', 'not a torch file', 'empty', 'wrong keys'])
def test_a_damaged_checkpoint_names_the_file_and_the_ways_out(tmp_path, damage):
    with make_run(tmp_path) as run:
        train_toy(run)
    ckpt = run.checkpoint
    whole = ckpt.read_bytes()
    ckpt.write_bytes({'truncated': whole[:len(whole) // 2], 'not a torch file': b'epoch: 3\n', 'empty': b''}.get(
        damage, b''))
    if damage == 'wrong keys':
        torch.save({'model': {}}, ckpt)
    with pytest.raises(runs.RunFolderError, match=rf'--resume: {ckpt} (is damaged|is not a resume state).*best.pth '
                                                    rf'is not one.*choose another name.*or delete {run.dir}$'):
        make_run(tmp_path, resume=True)


def test_resume_of_a_folder_whose_config_yaml_is_unreadable_says_what_to_do(tmp_path):
    with make_run(tmp_path) as run:
        train_toy(run)
    for text in (b'model: [unclosed\n', b'\xff\xfe\x00', b'- a list\n'):
        (run.dir / 'config.yaml').write_bytes(text)
        with pytest.raises(runs.RunFolderError, match=rf"(?s)--resume: .*{run.dir / 'config.yaml'}.*delete {run.dir}"):
            make_run(tmp_path, resume=True)
    (run.dir / 'config.yaml').unlink()
    with pytest.raises(runs.RunFolderError, match='does not exist'):
        make_run(tmp_path, resume=True)


@pytest.mark.skipif(not os.path.exists('/dev/full'), reason='needs /dev/full (Linux)')
@pytest.mark.parametrize('save', [lambda path: runs.atomic_save({'w': torch.zeros(10 ** 5)}, path),
                                  lambda path: runs.atomic_write('x' * 10 ** 6, path)])
def test_a_full_disk_names_the_file_keeps_the_last_good_one_and_leaves_no_temporary(tmp_path, save):
    path = tmp_path / 'checkpoint.pth'
    path.write_bytes(b'last good')
    (tmp_path / 'checkpoint.pth.tmp').symlink_to('/dev/full')   # every write to the temporary file: ENOSPC
    with pytest.raises(runs.RunFolderError, match=rf'{path}: not written, the disk is full.*Free space'):
        save(path)
    assert path.read_bytes() == b'last good' and os.listdir(tmp_path) == ['checkpoint.pth']


def test_a_quota_is_a_full_disk_too(tmp_path, monkeypatch):
    def over_quota(obj, f):
        f.write(b'half')
        raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))
    monkeypatch.setattr(torch, 'save', over_quota)
    with pytest.raises(runs.RunFolderError, match='Free space'):
        runs.atomic_save({}, tmp_path / 'best.pth')
    assert not list(tmp_path.iterdir())
