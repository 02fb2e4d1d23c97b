"""Stage 0: the pre-trained backbone that TPP adapts. MAE pre-training of a whole ViT on upstream images.

    python pretrain_backbone.py --config config.yaml [--set key=value ...]

With an official MAE checkpoint (backbone.checkpoint) there is nothing to do here: the other stages load it. With
backbone.checkpoint null they call `resolve(cfg)`, which returns the embedded default: every parameter of the MAE
(encoder and decoder) trained on synthetic *upstream* images, natural textures and other modalities' looks, a
different appearance from the downstream data (domain shift, as ImageNet is to CT). The default config's backbone is
shipped in weights/ (made by this script, ~20 min on 2 CPU cores; weights/README.md); any other recipe is trained
here once and cached in run.cache_dir. The name is a hash of everything that shapes the weights, so a changed recipe
trains a new backbone instead of reusing a stale one.

`train_mae` is the MAE training shared with stage 1: there only the targets (and the decoder) require grad.
`load_checkpoint` loads any backbone checkpoint (official MAE, timm, tpp) into the models of models.py.
"""
import argparse
import copy
import hashlib
import json
import math
import os
from collections import Counter
from collections.abc import Mapping
from pathlib import Path

import torch

import config
import data
import engine
import lora
import models
import synthetic


def train_mae(run, mae, dataset, ocfg, tag, frozen_after=None):
    """MAE training of whatever in `mae` requires grad, with the config section `ocfg` (its mask_ratio included);
    `frozen_after` as in engine.train."""
    loader = engine.make_loader(run, dataset, ocfg['batch_size'], train=True)
    loss_fn = lambda model, batch: model(batch['image'], ocfg['mask_ratio'])[0]   # (loss, pred, mask): no labels
    return engine.train(run, mae, loader, loss_fn, ocfg, betas=(0.9, 0.95), tag=tag,   # MAE's betas
                        frozen_after=frozen_after)


def upstream_dataset(cfg):
    """The synthetic upstream images as a SliceDataset (8-bit grey / 255, then data.mean / data.std; no augmentation,
    as the bootstrap has always trained)."""
    arch, boot = models.vit_kwargs(cfg['model']), cfg['backbone']['bootstrap']
    root = synthetic.synthetic_root('upstream', cfg['run']['cache_dir'], seed=boot['seed'], n=boot['images'],
                                    size=arch['img_size'], medical=boot['medical'])
    cases = [data.Case(p.stem, p, None, None) for p in sorted(root.glob('*.png'))]
    dcfg = {**cfg['data'], 'intensity': 'none', 'skip_empty': 0}
    return data.SliceDataset(cases, dcfg, arch['img_size'], arch['in_chans'], task=None, train=False)


WEIGHTS = Path(__file__).resolve().parent / 'weights'   # shipped default backbones, named like their cache folders


def grey(cfg):
    """The config the embedded default backbone is made from: the upstream images are grey, so it has one input
    channel (and the first data.mean / data.std value) whatever the data's channels; load_checkpoint adapts its patch
    embedding to a model with more (1 -> C), so colour and multi-sequence data share the shipped backbone."""
    cfg = copy.deepcopy(cfg)
    cfg['model']['in_chans'] = 1
    cfg['data']['mean'], cfg['data']['std'] = cfg['data']['mean'][:1], cfg['data']['std'][:1]
    return cfg


def default_path(cfg):
    """Where the embedded default backbone of this config lives (made or not) and the recipe it is made with: the
    shipped file of this recipe if there is one (weights/README.md), else its folder in run.cache_dir."""
    cfg = grey(cfg)
    boot = cfg['backbone']['bootstrap']
    if boot['medical'] == 0:   # a textures-only corpus is named without the key, as results/study's backbone (weights/)
        boot = {k: v for k, v in boot.items() if k != 'medical'}
    recipe = {'model': models.vit_kwargs(cfg['model']), 'mae': cfg['mae'], 'bootstrap': boot,
              'normalise': [cfg['data']['mean'], cfg['data']['std']],
              'data': synthetic.GENERATOR_VERSION}
    name = 'backbone-' + hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:10]
    shipped = WEIGHTS / f'{name}.pth'
    return (shipped if shipped.is_file() else Path(cfg['run']['cache_dir']) / name / 'backbone.pth'), recipe


def resolve(cfg):
    """Path of the backbone checkpoint: backbone.checkpoint, or the embedded default, made here once and cached."""
    if cfg['backbone']['checkpoint']:
        path = Path(cfg['backbone']['checkpoint'])
        if not path.is_file():
            raise config.ConfigError(f'backbone.checkpoint: {path} does not exist')
        return path
    path, recipe = default_path(cfg)
    if not path.is_file():
        pretrain(cfg, path, recipe)
    return path


def pretrain(cfg, path, recipe):
    """MAE pre-training of every parameter (but the fixed position embeddings) on the upstream images."""
    cfg, boot = grey(cfg), cfg['backbone']['bootstrap']
    boot_cfg = copy.deepcopy(cfg)
    boot_cfg['run']['out_dir'] = str(path.parent.parent)
    boot_cfg['run']['seed'] = boot['seed']                     # the backbone does not change with the run's seed
    resume = (path.parent / 'checkpoint.pth').is_file()        # an interrupted bootstrap continues where it stopped
    # the folder's name is its recipe's hash
    with engine.Run(boot_cfg, path.parent.name, resume, fixed=(), stage='bootstrap',
                    resumed_by='the same command (stage 0 resumes by itself)') as run:
        run.log(f'no backbone.checkpoint configured: pre-training the embedded default backbone with MAE on '
                f'{boot["images"]} synthetic upstream images (once; cached as {path})')
        mae = models.build_mae(cfg).to(run.device)
        lora.mark_trainable(mae, extra=[p for p in mae.parameters() if p.requires_grad])  # all but the fixed pos embeds
        train_mae(run, mae, upstream_dataset(cfg), boot, tag='bootstrap')
        if run.main:
            engine.atomic_save({'model': mae.state_dict(), 'recipe': recipe}, path)


# ----------------------------------------------------------------------------------------------------------------------
# Loading real checkpoints (official MAE, timm, tpp) into the model of models.py

class CheckpointError(config.UserError, ValueError):
    """A checkpoint that does not fit the model; the message names the key and the shapes."""


def _read_state_dict(ckpt):
    """Path or dict -> flat {name: tensor}: MAE/tpp {'model': sd}, timm bare sd, DDP/TaskModel prefixes removed.
    An unreadable file or a non-finite weight raises CheckpointError naming the file."""
    source = 'state dict'
    if isinstance(ckpt, (str, os.PathLike)):
        source = ckpt
        # weights_only refuses arbitrary pickles; the official MAE training checkpoints also hold an argparse
        # Namespace, which is plain data and safe to allow.
        try:
            with torch.serialization.safe_globals([argparse.Namespace]):
                ckpt = torch.load(ckpt, map_location='cpu', weights_only=True)
        except lora.UNREADABLE_FILE_ERRORS as e:
            raise CheckpointError(f'{source}: cannot be read as a PyTorch checkpoint (empty, truncated or another '
                                  f'kind of file): {type(e).__name__}: {str(e)[:200]}') from None
    if not isinstance(ckpt, Mapping):
        raise CheckpointError(f'{source}: a checkpoint must be a dict, got {type(ckpt).__name__}')
    for wrapper in ('model', 'state_dict'):
        if isinstance(ckpt.get(wrapper), Mapping):
            ckpt = ckpt[wrapper]
            break
    sd = {k.removeprefix('module.'): v for k, v in ckpt.items()}
    if any(k.startswith('backbone.') for k in sd):  # a tpp TaskModel: its head.* keys stay and are ignored
        sd = {k.removeprefix('backbone.'): v for k, v in sd.items()}
    for k, v in sd.items():
        if not torch.is_tensor(v):
            raise CheckpointError(f'checkpoint entry {k!r} is a {type(v).__name__}, not a tensor')
    bad = [k for k, v in sd.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise CheckpointError(f'{source}: NaN or Inf in {bad[:4]}: the file is damaged or its training diverged')
    return sd


def _resize_pos_embed(key, pos, shape):
    """(1, 1+G*G, D) -> shape (1, 1+g*g, D): bicubic on the patch grid, cls row kept (as MAE's fine-tuning)."""
    G, g = math.isqrt(pos.shape[1] - 1), math.isqrt(shape[1] - 1)
    if pos.ndim != 3 or pos.shape[2] != shape[2] or G * G != pos.shape[1] - 1:
        raise CheckpointError(f'{key}: checkpoint shape {tuple(pos.shape)} cannot be adapted to the model shape '
                              f'{tuple(shape)}')
    return torch.cat([pos[:, :1].float(), models.resize_pos_grid(pos[:, 1:], g)], dim=1), f'{key} {G}x{G}->{g}x{g}'


def _channel_map(c, C):
    """(C, c) 0/1: model channel j takes checkpoint channel i when i = j modulo min(c, C), so the checkpoint's
    channels repeat cyclically (c < C) or fold onto the model's (c > C)."""
    m = min(c, C)
    return (torch.arange(C)[:, None] % m == torch.arange(c)[None] % m).float()


def _adapt_patch_embed(key, w, shape):
    """(D, c, p, p) -> (D, C, p, p), as timm's adapt_input_conv: the channels repeat cyclically to C (or fold, summed,
    onto C < c), each checkpoint channel's weight split evenly over its copies. A grey image repeated to C channels
    then embeds as the checkpoint embeds it repeated to c: 3->1 sums, 1->C repeats / C, 3->6 repeats / 2 (timm's
    3/C); 3->2 and 3->4 split the repeated channel (timm's uniform 3/C scale would not keep this)."""
    c, C = w.shape[1], shape[1]
    if w.shape[:1] + w.shape[2:] != shape[:1] + shape[2:]:
        raise CheckpointError(f'{key}: checkpoint shape {tuple(w.shape)} cannot be adapted to the model shape '
                              f'{tuple(shape)}')
    share = _channel_map(c, C)
    share = share / share.sum(0)                                       # (C, c): each column sums to 1
    return torch.einsum('ji,di...->dj...', share, w.float()).to(w.dtype), f'{key} {c}->{C} channels'


def _adapt_decoder_pred(key, w, shape, pixels):
    """decoder_pred rows are (pixel, channel), channel fastest: each model channel predicts the mean of the checkpoint
    channels it takes (_channel_map): 3->1 averages (the grey value), 1->C copies (each channel predicts the grey)."""
    c, C = w.shape[0] // pixels, shape[0] // pixels
    if w.shape[0] % pixels or w.shape[1:] != shape[1:]:
        raise CheckpointError(f'{key}: checkpoint shape {tuple(w.shape)} cannot be adapted to the model shape '
                              f'{tuple(shape)}')
    mean = _channel_map(c, C)
    mean = mean / mean.sum(1, keepdim=True)                            # (C, c): each row sums to 1
    w = torch.einsum('ji,pi...->pj...', mean, w.reshape(pixels, c, *w.shape[1:]).float()).to(w.dtype)
    return w.reshape(shape), f'{key} {c}->{C} channels'


def _adapt(key, value, shape, patch_size):
    """Checkpoint tensor -> the model's shape, and a note of what was done (None when nothing)."""
    if value.shape == shape:
        return value, None
    if key in ('pos_embed', 'decoder_pos_embed'):
        return _resize_pos_embed(key, value, shape)
    if key == 'patch_embed.proj.weight':
        return _adapt_patch_embed(key, value, shape)
    if key in ('decoder_pred.weight', 'decoder_pred.bias'):
        return _adapt_decoder_pred(key, value, shape, patch_size ** 2)
    raise CheckpointError(f'{key}: checkpoint shape {tuple(value.shape)} does not fit the model shape {tuple(shape)}')


def load_checkpoint(model, ckpt, need_decoder=False):
    """Load a real checkpoint into a VisionTransformer or MaskedAutoencoder; return a one-line report.

    ckpt: a path or a dict: {'model': sd} (official MAE, encoder-only or with decoder; tpp, a TaskModel's
    backbone.* included), a bare state dict (timm), with or without DDP's 'module.'. pos_embed and
    decoder_pos_embed are interpolated to the model's patch grid; input channels are adapted (see
    _adapt_patch_embed, _adapt_decoder_pred). The decoder is loaded when both have one; an encoder-only checkpoint
    leaves a model's decoder as initialised. Checkpoint keys outside the model's modules (head.*, fc_norm.*, a
    decoder the model lacks) are ignored and reported. A missing model key, a checkpoint key inside the model's
    modules that the model lacks, or a shape that cannot be adapted raises CheckpointError naming the key and the
    shapes. need_decoder: the decoder stays frozen (pretrain.train_decoder false), so the checkpoint must have one.
    """
    if not isinstance(model, models.VisionTransformer):
        raise TypeError(f'load_checkpoint loads backbones (VisionTransformer, MaskedAutoencoder), '
                        f'not {type(model).__name__}')
    source = os.path.basename(os.fspath(ckpt)) if isinstance(ckpt, (str, os.PathLike)) else 'state dict'
    sd, own = _read_state_dict(ckpt), model.state_dict()
    model_has_decoder = any(models.is_decoder_key(k) for k in own)
    own_tops = {k.split('.')[0] for k in own}

    loaded, interpolated, adapted, ignored = {}, [], [], Counter()
    for key, value in sd.items():
        if key in own:
            loaded[key], note = _adapt(key, value, own[key].shape, model.patch_embed.patch_size)
            if note:
                (interpolated if key.endswith('pos_embed') else adapted).append(note)
        elif key.split('.')[0] in own_tops:  # inside one of our modules: a different architecture, never drop it
            hint = ' (set mae: to the checkpoint decoder sizes)' if models.is_decoder_key(key) else ''
            raise CheckpointError(f'{key} (shape {tuple(value.shape)}) is in the checkpoint but has no place in '
                                  f'the model{hint}')
        else:
            ignored['decoder' if models.is_decoder_key(key) else key.split('.')[0] + ('.*' if '.' in key else '')] += 1

    ckpt_has_decoder = any(models.is_decoder_key(k) for k in loaded)
    if need_decoder and model_has_decoder and not ckpt_has_decoder:
        raise CheckpointError(f'{source} has no MAE decoder and pretrain.train_decoder is false: the targets would be '
                              f'pre-trained through a random frozen decoder. Set pretrain.train_decoder=true, or use '
                              f'a checkpoint with a decoder')
    missing = [k for k in own if k not in loaded and not (models.is_decoder_key(k) and not ckpt_has_decoder)]
    if missing:
        shown = ', '.join(f'{k} {tuple(own[k].shape)}' for k in missing[:5])
        raise CheckpointError(f'{len(missing)} model keys missing from the checkpoint: {shown}'
                              + (', ...' if len(missing) > 5 else ''))
    model.load_state_dict(loaded, strict=False)  # loose load, after the exact check above

    n_dec = sum(map(models.is_decoder_key, loaded))
    report = [f'loaded {len(loaded)} tensors from {source} (encoder {len(loaded) - n_dec}, decoder {n_dec})']
    if model_has_decoder and not ckpt_has_decoder:
        report.append('no decoder in the checkpoint: decoder kept as initialised')
    if interpolated:
        report.append('interpolated ' + ', '.join(interpolated))
    if adapted:
        report.append('adapted ' + ', '.join(adapted))
    if ignored:
        report.append('ignored ' + ', '.join(f'{name} ({n})' for name, n in sorted(ignored.items())))
    return '; '.join(report)


def main(args):
    cfg = config.load_config(args.config, args.set, stage=0)
    engine.preflight(cfg)
    path = resolve(cfg)
    print(f'backbone: {path}', flush=True)
    return path


if __name__ == '__main__':
    engine.cli(main, __doc__)
