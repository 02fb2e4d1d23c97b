"""The training engine shared by every stage (the backbone bootstrap, stage 1 and stage 2): data loaders, AdamW with
warm-up + cosine, the one training loop with its per-epoch evaluation and checkpoints, and the MAE training call.
Nothing here knows about TPP (the two stage scripts hold the method) or about run folders (runs.py)."""
import math
import random
import time

import numpy as np
import torch
import torch.distributed as dist

import runs
from config import ConfigError, UserError


class NonFiniteLossError(UserError, RuntimeError):
    pass


# ----------------------------------------------------------------------------------------------------------------------
# Data loaders and the ranks of torchrun

def _seed_worker(worker_id):
    seed = torch.initial_seed() % 2 ** 32          # torch seeds each worker from the loader's generator
    np.random.seed(seed)
    random.seed(seed)


def make_loader(run, dataset, batch_size, train):
    """Training loaders shuffle from their own seeded generator (saved in checkpoints, so resume is exact) and drop
    the last partial batch; under torchrun a DistributedSampler gives each rank its share."""
    if train and len(dataset) < batch_size * run.world:
        raise ConfigError(f'only {len(dataset)} training images for a global batch of {batch_size * run.world}: '
                         f'lower the batch_size or use more data')
    sampler = None
    if run.world > 1:
        sampler = torch.utils.data.DistributedSampler(dataset, shuffle=train, seed=run.cfg['run']['seed'],
                                                      drop_last=train)
    generator = torch.Generator().manual_seed(run.cfg['run']['seed'])
    workers = run.cfg['run']['workers']
    return torch.utils.data.DataLoader(
        dataset, batch_size, shuffle=train and sampler is None, sampler=sampler, drop_last=train,
        num_workers=workers, persistent_workers=workers > 0, pin_memory=run.device.type == 'cuda',
        worker_init_fn=_seed_worker, generator=generator)


def to_device(batch, device):
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def gather(run, items):
    """Every rank's list, on every rank (evaluation metrics are computed over all samples, as one process). The
    lists are interleaved, which for an evaluation loader (one item per sample) restores the dataset order; the
    DistributedSampler's padding (repeats of the first samples) comes last."""
    if run.world == 1:
        return items
    out = [None] * run.world
    dist.all_gather_object(out, items)
    merged = []
    for i in range(max(map(len, out))):
        merged += [part[i] for part in out if i < len(part)]
    return merged


def _mean_over_ranks(run, value):
    """All ranks' mean of a tensor (the global-batch mean of per-rank means: ranks have equal batches)."""
    if run.world > 1:
        dist.all_reduce(value)
        value /= run.world
    return value


# ----------------------------------------------------------------------------------------------------------------------
# Optimiser and schedule

def build_optimizer(model, lr, weight_decay, betas=(0.9, 0.999)):
    """AdamW over the trainable parameters only; no weight decay on biases, norms and tokens."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            skip = p.ndim < 2 or name.endswith(('cls_token', 'mask_token', 'pos_embed'))
            (no_decay if skip else decay).append(p)
    groups = [{'params': decay, 'weight_decay': weight_decay}, {'params': no_decay, 'weight_decay': 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=True)   # fused kernels on CPU and CUDA alike


def lr_at(step, total, warmup, peak):
    """Linear warm-up to `peak`, then cosine decay to zero."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def scaled_lr(run, ocfg):
    """Config lrs are for one process's batch_size; torchrun multiplies the batch, so the lr scales linearly."""
    return ocfg['lr'] * run.world


# ----------------------------------------------------------------------------------------------------------------------
# Checkpoints: what a training run saves of its model

def trainable_state(model, trained):
    """What a training checkpoint needs: the parameters the run trains (`trained`, their names; kept even once
    frozen_after stops them) and the buffers. The frozen backbone is rebuilt from its own checkpoint, so stage-1
    checkpoints stay as small as the targets."""
    names = set(trained) | {n for n, _ in model.named_buffers()}
    return {k: v for k, v in model.state_dict().items() if k in names}


def load_trainable_state(model, sd, source='checkpoint'):
    """Load loosely, then check precisely (as MAE does): only frozen parameters may be missing."""
    missing, unexpected = model.load_state_dict(sd, strict=False)
    frozen = {n for n, p in model.named_parameters(remove_duplicate=False) if not p.requires_grad}   # shared too
    wrong = sorted(set(missing) - frozen) + sorted(unexpected)
    if wrong:
        raise runs.RunFolderError(f'{source} does not fit the model (another model, init or PEFT setting): missing or '
                                  f'unexpected {wrong[:6]}')


# ----------------------------------------------------------------------------------------------------------------------
# The training loop (bootstrap, stage 1 and stage 2 all use this one)

def train(run, model, loader, loss_fn, ocfg, betas=(0.9, 0.999), evaluate=None, tag='train', after_step=None,
          frozen_after=None, before_step=None):
    """Train the parameters of `model` that require grad. `loss_fn(model, batch) -> loss` (scalar tensor);
    `evaluate(model) -> dict` of floats runs after every epoch, logged and kept in the history: with 'score' (higher
    is better) they are validation metrics and pick `best.pth`, without it training statistics (DINO's);
    `before_step(model)` runs between the backward pass (and clipping) and the optimiser step (DINO's last-layer
    freeze); `after_step(model)` after every optimiser step (DINO's teacher update; what it changes is a buffer).
    `frozen_after=(n, params)`: these parameters stop training after n optimiser steps (no gradient, no update).
    `ocfg` is the stage's config section: epochs, lr, weight_decay, warmup_epochs, clip_grad. Saves `checkpoint.pth`
    every epoch and, with --resume, continues from it exactly (_resume). Returns the steps, best score and history."""
    run.start()                         # every check of the stage has passed: the run folder is made now
    net = _distributed(run, model, frozen_after, tag)
    peak = scaled_lr(run, ocfg)
    optimizer = build_optimizer(model, peak, ocfg['weight_decay'], betas)
    scaler = torch.amp.GradScaler(run.device.type, enabled=run.amp == torch.float16)
    params = [p for p in model.parameters() if p.requires_grad]
    trained = {n for n, p in model.named_parameters() if p.requires_grad}   # saved even once frozen_after stops them
    epochs, per_epoch = ocfg['epochs'], len(loader)
    total, warmup = epochs * per_epoch, ocfg['warmup_epochs'] * per_epoch
    epoch0, step, best, history = _resume(run, model, optimizer, scaler, loader, tag)
    for epoch in range(epoch0, epochs):
        if hasattr(loader.sampler, 'set_epoch'):
            loader.sampler.set_epoch(epoch)
        model.train()
        progress = _Progress(run, tag, epoch, epochs, total)
        for i, batch in enumerate(loader):
            if frozen_after and step >= frozen_after[0]:      # a pure function of the step: exact on resume
                for p in frozen_after[1]:
                    p.requires_grad_(False)
            lr = lr_at(step, total, warmup, peak)
            for group in optimizer.param_groups:
                group['lr'] = lr
            batch = to_device(batch, run.device)
            with run.autocast():
                loss = loss_fn(net, batch)
            scaler.scale(loss).backward()
            if ocfg['clip_grad']:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(params, ocfg['clip_grad'])
            if before_step:
                before_step(model)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            if after_step:
                after_step(model)
            step += 1
            progress.add(loss, len(batch['image']), step, lr, last=i == per_epoch - 1)
        metrics = _evaluate(run, model, evaluate, tag, epoch, step)
        history.append({'epoch': epoch + 1, 'step': step, 'train_loss': progress.epoch_loss(), **metrics})
        best, improved = _best(best, metrics, epoch)
        _save(run, model, trained, metrics if improved else None,
              {'optimizer': optimizer.state_dict(), 'scaler': scaler.state_dict(), 'rng': run.rng_state(loader),
               'epoch': epoch, 'step': step, 'best': best, 'history': history})
    return {'steps': step, 'best': best, 'history': history}


def _distributed(run, model, frozen_after, tag):
    """The model the loss runs through: `model` itself, or under torchrun its DistributedDataParallel wrapper. DDP
    starts every rank from rank 0's parameters and buffers (ranks are seeded differently) and then averages the
    gradients of the trainable parameters only: frozen ones are neither reduced nor checked for use. Each rank's loss
    is its batch mean, so the average is the global-batch mean (drop_last keeps batches equal). Every trainable
    parameter must take part in the loss (no find_unused_parameters: it costs a graph walk)."""
    if run.world == 1:
        return model
    if frozen_after:   # DDP waits for the gradient of every parameter it was built with
        raise ConfigError(f'{tag}: freezing parameters mid-run (decoder_warmup_steps) needs a single process')
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=[run.device] if run.device.type == 'cuda'
                                                     else None)


def _resume(run, model, optimizer, scaler, loader, tag):
    """(first epoch, step, best score, history): of a new run, or with --resume of its checkpoint.pth, whose
    parameters, optimiser, grad scaler and random states are loaded: the run continues exactly (the schedule is a
    function of the step; TensorBoard drops the events after it, see runs.Run.start)."""
    ckpt = run.take_resume_state()
    if ckpt is None:
        return 0, 0, -math.inf, []
    load_trainable_state(model, ckpt['model'], run.checkpoint)
    optimizer.load_state_dict(ckpt['optimizer'])
    scaler.load_state_dict(ckpt['scaler'])
    run.restore_rng(ckpt['rng'], loader, tag)
    run.log(f"{tag}: resumed from {run.checkpoint} at epoch {ckpt['epoch'] + 1}, step {ckpt['step']}")
    if run.cfg['run']['workers']:   # persistent workers restart with fresh random states (see docs/runs.md)
        run.log(f'{tag}: warning: resume is not exact with run.workers > 0 (shuffling and augmentation differ)')
    return ckpt['epoch'] + 1, ckpt['step'], ckpt['best'], ckpt['history']


class _Progress:
    """One epoch's losses: a progress line every run.log_every steps and at the epoch's end (mean loss, lr, images/s,
    time left; TensorBoard too), the loop's only host sync. A non-finite mean stops the run: NonFiniteLossError."""

    def __init__(self, run, tag, epoch, epochs, total):
        self.run, self.tag, self.epoch, self.epochs, self.total = run, tag, epoch, epochs, total
        self.sum, self.epoch_sum = torch.zeros((), device=run.device), torch.zeros((), device=run.device)
        self.n, self.n_epoch, self.images, self.t0 = 0, 0, 0, time.time()

    def add(self, loss, batch_size, step, lr, last):
        run = self.run
        self.sum += loss.detach().float()
        self.epoch_sum += loss.detach().float()
        self.n, self.n_epoch, self.images = self.n + 1, self.n_epoch + 1, self.images + batch_size * run.world
        if step % run.cfg['run']['log_every'] and not last:
            return
        avg = _mean_over_ranks(run, self.sum).item() / self.n
        if not math.isfinite(avg):
            kept = f'the last good checkpoint is kept ({run.checkpoint})' if self.epoch else 'no checkpoint yet'
            raise NonFiniteLossError(
                f'{self.tag}: loss became {avg} in epoch {self.epoch + 1}, steps {step - self.n + 1}-{step}; '
                f'stopped; {kept}. Lower the lr, clip gradients, or use run.amp=bf16/off')
        speed = self.images / (time.time() - self.t0)
        eta = (self.total - step) * batch_size * run.world / speed
        run.log(f'{self.tag} epoch {self.epoch + 1}/{self.epochs} step {step}/{self.total} loss {avg:.4f} lr {lr:.2e} '
                f"{speed:.0f} img/s eta {time.strftime('%H:%M:%S', time.gmtime(max(0, eta)))}")
        if run.writer:
            for name, value in (('loss', avg), ('lr', lr), ('images_per_s', speed)):
                run.writer.add_scalar(f'{self.tag}/{name}', value, step)
        self.sum.zero_()
        self.n, self.images, self.t0 = 0, 0, time.time()

    def epoch_loss(self):
        """The epoch's mean loss over all ranks."""
        return _mean_over_ranks(self.run, self.epoch_sum).item() / self.n_epoch


def _evaluate(run, model, evaluate, tag, epoch, step):
    """The epoch's evaluate(model) ({} without), the same on every rank (predictions of all ranks gathered); its
    floats are logged, and written to TensorBoard (under val/ when they hold a 'score')."""
    if run.world > 1:   # BatchNorm statistics: rank 0's (what its checkpoint saves) on every rank, for evaluation
        for buffer in model.buffers():
            dist.broadcast(buffer, 0)
    metrics = evaluate(model) if evaluate else {}
    if metrics:
        floats = {k: v for k, v in metrics.items() if isinstance(v, float)}
        run.log(f'{tag} epoch {epoch + 1} ' + ' '.join(f'{k} {v:.4f}' for k, v in floats.items()))
        for k, v in floats.items() if run.writer else ():
            run.writer.add_scalar(f"{'val' if 'score' in metrics else tag}/{k}", v, step)
    return metrics


def _best(best, metrics, epoch):
    """(best score so far, whether this epoch is the new best): metrics with a 'score' only, a NaN score never beats
    another; epoch 1 always is one (stage 2 needs a best.pth)."""
    score = metrics.get('score', math.nan)
    score = score if math.isfinite(score) else -math.inf
    return max(best, score), 'score' in metrics and (score > best or epoch == 0)


def _save(run, model, trained, best_metrics, state):
    """Rank 0 saves the epoch: best.pth (the model and `best_metrics`, unless None) and checkpoint.pth (the model and
    the resume `state`), each atomically; no rank goes on (to read best.pth, or to resume) before they are written."""
    if run.main:
        if best_metrics is not None:
            runs.atomic_save({'model': trainable_state(model, trained), 'epoch': state['epoch'] + 1,
                              'metrics': best_metrics}, run.dir / 'best.pth')
        runs.atomic_save({'model': trainable_state(model, trained), **state}, run.checkpoint)
    run.barrier()


def train_mae(run, mae, dataset, ocfg, tag, frozen_after=None):
    """MAE training of whatever in `mae` requires grad (the whole MAE in stage 0, the targets in stage 1), with the
    config section `ocfg` (its mask_ratio included); `frozen_after` as in train."""
    loader = make_loader(run, dataset, ocfg['batch_size'], train=True)
    loss_fn = lambda model, batch: model(batch['image'], ocfg['mask_ratio'])[0]   # (loss, pred, mask): no labels
    return train(run, mae, loader, loss_fn, ocfg, betas=(0.9, 0.95), tag=tag, frozen_after=frozen_after)  # MAE's betas
