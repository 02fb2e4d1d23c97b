"""Run plumbing shared by every stage: the command line of the entry points, the checks before anything is written,
run folders (marker, lock, log, TensorBoard, checkpoint files and exact resume), device and AMP, seeding, torchrun's
process group and atomic writes. Nothing here trains: engine.py holds the training loop."""
import argparse
import errno
import os
import random
import socket
import sys
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import yaml

from config import ConfigError, UserError, read_yaml


class RunFolderError(UserError):
    """A run folder that cannot be used as asked (not tpp's, another stage's, in use, finished, missing, damaged,
    full disk); the message says the way out."""


# ----------------------------------------------------------------------------------------------------------------------
# The command line of every entry point

def parse_args(description):
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--config', default='config.yaml', help='YAML config (keys documented in config.yaml)')
    p.add_argument('--set', action='append', default=[], metavar='KEY=VALUE', help='override, e.g. pretrain.lr=1e-3')
    p.add_argument('--resume', action='store_true', help='continue the run folder from its last checkpoint')
    return p.parse_args()


def cli(main, description):
    """Run an entry point's main(args) under exit_on_user_error."""
    return exit_on_user_error(main, parse_args(description))


def exit_on_user_error(main, *args):
    """main(*args), with a UserError printed as one `error: ...` line on stderr and exit status 2, with no traceback
    (TPP_DEBUG=1 shows it); Ctrl-C exits with status 130 after the run's line on how to continue; any other exception
    is a bug and keeps its traceback."""
    try:
        return main(*args)
    except (UserError, KeyboardInterrupt) as e:
        if os.environ.get('TPP_DEBUG') == '1':
            raise
        if isinstance(e, KeyboardInterrupt):
            sys.exit(130)
        print(f'error: {e}', file=sys.stderr, flush=True)
        sys.exit(2)


def check_writable(path, key):
    """Refuse a folder that cannot be made or written (read-only, under a file) before a stage writes anything."""
    path = Path(path).expanduser().absolute()
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        raise ConfigError(f'{key}: {path} cannot be made: {existing} is a file, not a folder')
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f'{key}: {path} cannot be written ({existing} is read-only for this user): choose '
                          f'another folder')


def preflight(cfg):
    """What the schema cannot see, checked before a stage writes anything: the run and cache folders can be written,
    run.device exists and run.amp suits it."""
    check_writable(cfg['run']['out_dir'], 'run.out_dir')
    check_writable(cfg['run']['cache_dir'], 'run.cache_dir')
    _pick_amp(cfg['run']['amp'], pick_device(cfg['run']['device'], int(os.environ.get('LOCAL_RANK', 0))))


# ----------------------------------------------------------------------------------------------------------------------
# A run: its folder, device, precision, process group, logging

FIXED_ON_RESUME = ('model', 'mae', 'peft', 'backbone', 'data')   # what a resumed run must share with its start
MARKER = '.tpp-run'   # written when tpp makes a run folder; holds the stage that made it
LOCK = '.lock'        # "<pid> <host>" of the process writing the folder, while it runs
RESUME_KEYS = ('model', 'optimizer', 'scaler', 'rng', 'epoch', 'step', 'best', 'history')   # of checkpoint.pth


class Run:
    """One training run: `<run.out_dir>/<name>`, the device and AMP dtype, the torchrun rank, log and TensorBoard.
    Use it as `with Run(...) as run:`; leaving the block (also by an error or Ctrl-C) releases the folder.
    Making one only checks; the folder is made by start() when training starts (train calls it), so a stage that
    fails its own checks first (data, checkpoints, targets) leaves nothing behind. tpp writes only into folders it
    made (MARKER names the stage: another stage's folder is refused) and one process at a time (LOCK). A folder with
    no checkpoint.pth (stopped before its first epoch ended) is reused; one with a checkpoint is only continued with
    --resume, which refuses a changed `fixed` section; one holding `result` (what the finished stage writes last) is
    never touched again. Under torchrun every rank makes one; only rank 0 writes the folder (log, TensorBoard,
    checkpoints) and holds its lock."""

    def __init__(self, cfg, name, resume=False, result=None, fixed=FIXED_ON_RESUME, stage='run',
                 resumed_by='the same command with --resume'):
        self.cfg, self.resume, self.result, self.stage, self.resumed_by = cfg, resume, result, stage, resumed_by
        self.started, self.locked, self._unwritten, self.writer = False, False, [], None
        self.device = pick_device(cfg['run']['device'], int(os.environ.get('LOCAL_RANK', 0)))
        self.rank, self.world = _init_distributed(self.device)
        self.amp = _pick_amp(cfg['run']['amp'], self.device)
        self.dir = Path(cfg['run']['out_dir']) / name
        self.checkpoint, self.lock = self.dir / 'checkpoint.pth', self.dir / LOCK
        named_by = f'{stage}.name' if isinstance(cfg.get(stage), dict) and 'name' in cfg[stage] else None
        self.rename = f'choose another name (--set {named_by}=...)' if named_by else 'choose another name'
        self._check_folder()
        if resume:   # before anything is written: a changed setting would silently mix two runs
            saved = self._saved_config()
            changed = [k for section in fixed for k in _changed(saved.get(section), cfg[section], section)]
            if changed:
                raise ConfigError(f"--resume: {', '.join(changed)} differs from {self.dir / 'config.yaml'}: resume "
                                  f'with the settings the run started with, or start a new run (another name)')
        self._resume_state = self._read_checkpoint() if resume else None   # train() takes it (take_resume_state)
        seed_everything(cfg['run']['seed'] + self.rank)   # ranks differ in masking/dropout noise, not in data order
        self.log(f'run folder {self.dir} | device {self.device} | amp {self.amp or "off"} | processes {self.world}')

    def _check_folder(self):
        """Refuse a folder this run must not write: not made by tpp, made by another stage, in use by another
        process, finished, or holding a checkpoint without --resume (none with it)."""
        marker = self.dir / MARKER
        if self.dir.exists() and not marker.is_file() and (not self.dir.is_dir() or
                                                            any(p.name != LOCK for p in self.dir.iterdir())):
            raise RunFolderError(f'{self.dir} exists and is not a tpp run folder (no {MARKER} in it): tpp never writes '
                                 f'into it; {self.rename} or another run.out_dir')
        made_by = marker.read_text().strip() if marker.is_file() else self.stage
        if made_by != self.stage:
            raise RunFolderError(f'{self.dir} is a {made_by} run folder and a {self.stage} run never writes into it: '
                                 f'{self.rename}')
        if self.main and not self.locked:
            self._stale_lock()
        if self.result and (self.dir / self.result).is_file():
            raise RunFolderError(f'{self.dir} is a finished run ({self.result} written) and runs are never '
                                 f'overwritten: {self.rename} or delete it')
        if self.resume and not self.checkpoint.is_file():
            raise RunFolderError(f'--resume: {self.checkpoint} does not exist (nothing to resume)')
        if not self.resume and self.checkpoint.is_file():
            raise RunFolderError(f'{self.dir} exists and runs are never overwritten: pass --resume to continue '
                                 f'it, {self.rename}, or delete it')

    def _stale_lock(self):
        """The lock's text when it is stale (its process is gone from this host), None when there is none; a lock
        of a live process, of another host or unreadable refuses."""
        try:
            held = self.lock.read_text().strip()
        except FileNotFoundError:
            return None
        pid, _, host = held.partition(' ')
        if host == socket.gethostname() and pid.isdigit() and not _alive(int(pid)):
            return held
        raise RunFolderError(f'{self.dir} is in use by process {pid or "?"} on {host or "?"} (lock {self.lock}): '
                             f'wait until that run ends, or {self.rename}; if no such process runs, delete the lock')

    def _take_lock(self):
        """Hold the folder: LOCK made atomically (O_EXCL: of two processes one gets it). A stale one is taken over."""
        while True:
            try:
                fd = os.open(self.lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                stale = self._stale_lock()
                if stale:
                    self.log(f'{self.lock}: stale lock of process {stale} (no such process): taken over')
                    self.lock.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, 'w') as f:
                f.write(f'{os.getpid()} {socket.gethostname()}\n')
            self.locked = True
            return

    def _no_resume(self, why):
        return RunFolderError(f'--resume: {why}. tpp keeps one resume state per run (best.pth is not one): put back '
                              f'a copy of the folder if you kept one, else start again: {self.rename}, or delete '
                              f'{self.dir}')

    def _saved_config(self):
        path = self.dir / 'config.yaml'
        try:
            saved = read_yaml(path)
        except ConfigError as e:   # names the file
            raise self._no_resume(e) from None
        except (OSError, UnicodeDecodeError) as e:
            raise self._no_resume(f'{path} cannot be read ({e})') from None
        if not isinstance(saved, dict):
            raise self._no_resume(f'{path} is not a config (a mapping of sections)')
        return saved

    def _read_checkpoint(self):
        """The resume state, read on the CPU (RNG states stay CPU tensors); a damaged file refuses, naming it."""
        try:
            ckpt = torch.load(self.checkpoint, map_location='cpu', weights_only=False)
        except Exception as e:   # a damaged pickle can raise nearly anything; none of it is resumable
            raise self._no_resume(f'{self.checkpoint} is damaged (empty, truncated or not a checkpoint: '
                                  f'{type(e).__name__}: {str(e)[:120]})') from None
        missing = [k for k in RESUME_KEYS if k not in ckpt] if isinstance(ckpt, dict) else list(RESUME_KEYS)
        if missing:
            raise self._no_resume(f'{self.checkpoint} is not a resume state (no {", ".join(missing)})')
        return ckpt

    def take_resume_state(self):
        """The checkpoint --resume continues (read and checked when the run was made), once; None without --resume."""
        state, self._resume_state = self._resume_state, None
        return state

    def rng_state(self, loader):
        """Every random state of every rank (Python, NumPy, torch, the loader's shuffling, the rank's GPU), for
        checkpoint.pth: ranks differ in their masking and dropout noise."""
        state = _rng_state(loader, self.device)
        if self.world == 1:
            return state
        states = [None] * self.world
        dist.all_gather_object(states, state)
        return states

    def restore_rng(self, states, loader, tag):
        """Continue the random states of rng_state (one per rank); a checkpoint of another number of processes keeps
        the current ones, and says so."""
        states = states if isinstance(states, list) else [states]
        if len(states) == self.world:
            _set_rng_state(states[self.rank], loader, self.device)
        else:
            self.log(f'{tag}: checkpoint of {len(states)} processes resumed with {self.world}: random states not '
                     f'restored')

    def start(self):
        """Make (or continue) the run folder, once every check has passed: lock it, then write the marker,
        config.yaml, TensorBoard and the log so far."""
        if self.started:
            return
        if self.main:
            self.dir.mkdir(parents=True, exist_ok=True)
            self._take_lock()
            self._check_folder()   # again, holding the lock: another process may have finished the run meanwhile
            if not (self.dir / MARKER).is_file():
                atomic_write(self.stage + '\n', self.dir / MARKER)
            atomic_write(yaml.safe_dump(self.cfg, sort_keys=False), self.dir / 'config.yaml')
            from torch.utils.tensorboard import SummaryWriter  # imported here: slow, and only rank 0 writes
            start = self._resume_state['step'] if self.resume else 0
            self.writer = SummaryWriter(self.dir / 'tensorboard', purge_step=start)  # resume drops events after it
        self.started = True
        self.log()
        self.barrier()

    @property
    def main(self):
        return self.rank == 0

    def log(self, msg=None):
        """Print a line (rank 0); log.txt gets it once the folder exists (no msg: write what is waiting)."""
        if self.main:
            if msg is not None:
                print(msg, flush=True)
                self._unwritten.append(msg + '\n')
            if self.started:
                with open(self.dir / 'log.txt', 'a') as f:
                    f.writelines(self._unwritten)
                self._unwritten.clear()

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp) if self.amp else nullcontext()

    def barrier(self):
        if self.world > 1:
            dist.barrier()

    def close(self):
        self.barrier()                  # every rank leaves together: rank 0 may still be writing the run's files
        self._release()

    def _release(self):
        if self.writer:
            self.writer.close()
            self.writer = None
        if self.locked:
            self.lock.unlink(missing_ok=True)
            self.locked = False

    def __enter__(self):
        return self

    def __exit__(self, kind, error, traceback):
        """The end of the run: close it; after an error release the folder at once (no waiting for other ranks)."""
        if kind is None:
            self.close()
            return
        if issubclass(kind, KeyboardInterrupt) and self.started:
            self.log(f'interrupted: {self.resumed_by} continues the run from {self.checkpoint}'
                     if self.checkpoint.is_file() else 'interrupted before the first checkpoint: run the same '
                     'command again to start over')
        self._release()



def _alive(pid):
    """Whether process `pid` exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:   # another user's process
        pass
    return True


def _changed(saved, now, key):
    """Dotted keys whose values differ between a saved config section and this one."""
    if isinstance(saved, dict) and isinstance(now, dict):
        return [k for sub in {**saved, **now} for k in _changed(saved.get(sub), now.get(sub), f'{key}.{sub}')]
    return [] if saved == now else [key]


def _init_distributed(device):
    """Under torchrun (WORLD_SIZE > 1) join the process group: NCCL on GPUs, gloo on CPU. Plain runs skip it all.
    Returns (rank, world size)."""
    world = int(os.environ.get('WORLD_SIZE', 1))
    if world == 1:
        return 0, 1
    if not dist.is_initialized():
        dist.init_process_group('nccl' if device.type == 'cuda' else 'gloo')
    return dist.get_rank(), world


def pick_device(name, local_rank):
    if name == 'auto':
        name = 'cuda' if torch.cuda.is_available() else 'cpu'
    if name == 'cuda':
        name = f'cuda:{local_rank}'
    if name.startswith('cuda') and not torch.cuda.is_available():
        raise ConfigError(f'run.device: {name} requested but CUDA is not available (use auto or cpu)')
    if name.startswith('cuda') and int(name[5:]) >= torch.cuda.device_count():
        raise ConfigError(f'run.device: {name} requested but there are {torch.cuda.device_count()} CUDA devices '
                          f'(cuda:0 to cuda:{torch.cuda.device_count() - 1})')
    device = torch.device(name)
    if device.type == 'cuda':
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    return device


def _pick_amp(amp, device):
    if amp == 'auto':
        if device.type != 'cuda':
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
    if amp == 'fp16' and device.type != 'cuda':
        raise ConfigError('run.amp: fp16 needs CUDA; on CPU use bf16 or off')
    return {'off': None, 'bf16': torch.bfloat16, 'fp16': torch.float16}[amp]   # config.SCHEMA: one of these


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------------------------------------------------
# Files: written atomically; the random states of a checkpoint

def atomic_save(obj, path):
    """torch.save to a temporary file, then rename: a crash never leaves a truncated checkpoint behind."""
    _atomic(path, lambda f: torch.save(obj, f))   # a file object: a full disk is an OSError with its errno


def atomic_write(text, path):
    _atomic(path, lambda f: f.write(text.encode()))


def _atomic(path, write):
    """write(file) into `path` + '.tmp', then rename over `path`. On failure the temporary file is removed and the
    previous `path` is kept; a full disk is a RunFolderError."""
    path = Path(path)
    tmp = path.with_name(path.name + '.tmp')
    try:
        with open(tmp, 'wb') as f:
            write(f)
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise RunFolderError(f'{path}: not written, the disk is full ({e.strerror}); the previous {path.name}, '
                                 f'if any, is kept. Free space, then run the same command again (with --resume if '
                                 f'the run has a checkpoint.pth)') from None
        raise


def _rng_state(loader, device):
    state = {'python': random.getstate(), 'numpy': np.random.get_state(), 'torch': torch.get_rng_state(),
             'loader': loader.generator.get_state()}
    if device.type == 'cuda':
        state['cuda'] = torch.cuda.get_rng_state(device)   # this run's GPU only: each rank saves its own
    return state


def _set_rng_state(state, loader, device):
    random.setstate(state['python'])
    np.random.set_state(state['numpy'])
    torch.set_rng_state(state['torch'])
    loader.generator.set_state(state['loader'])
    if device.type == 'cuda':
        torch.cuda.set_rng_state(state['cuda'], device)


