"""Stage 0: the pre-trained backbone that TPP adapts. MAE pre-training of a whole ViT on upstream images.

    python pretrain_backbone.py --config config.yaml [--set key=value ...]

With an official MAE checkpoint (backbone.checkpoint) there is nothing to do here: the other stages load it. With
backbone.checkpoint null they call `resolve(cfg)`, which makes the embedded default once and caches it in
run.cache_dir: every parameter of the MAE (encoder and decoder) trained on synthetic *upstream* images, a different
appearance from the downstream data (domain shift, as ImageNet is to CT). Running this script first only moves that
one-time cost out of stage 1. The cache folder's name is a hash of everything that shapes the weights, so a changed
recipe trains a new backbone instead of reusing a stale one.

`train_mae` is the MAE training shared with stage 1: there only the targets (and the decoder) require grad.
"""
import copy
import hashlib
import json
from pathlib import Path

import data
import engine
import lora
import models
import synthetic


def train_mae(run, mae, dataset, ocfg, tag):
    """MAE training of whatever in `mae` requires grad, with the config section `ocfg` (its mask_ratio included)."""
    loader = engine.make_loader(run, dataset, ocfg['batch_size'], train=True)
    loss_fn = lambda model, batch: model(batch['image'], ocfg['mask_ratio'])[0]   # (loss, pred, mask): no labels
    return engine.train(run, mae, loader, loss_fn, ocfg, betas=(0.9, 0.95), tag=tag)   # MAE's betas


def upstream_dataset(cfg):
    """The synthetic upstream images as a SliceDataset (8-bit grey / 255, then data.mean / data.std; no augmentation,
    as the bootstrap has always trained)."""
    arch, boot = models.vit_kwargs(cfg['model']), cfg['backbone']['bootstrap']
    root = synthetic.synthetic_root('upstream', cfg['run']['cache_dir'], seed=cfg['run']['seed'], n=boot['images'],
                                    size=arch['img_size'])
    cases = [data.Case(p.stem, p, None, None) for p in sorted(root.glob('*.png'))]
    dcfg = {**cfg['data'], 'intensity': 'none', 'skip_empty': 0}
    return data.SliceDataset(cases, dcfg, arch['img_size'], arch['in_chans'], task=None, train=False)


def default_path(cfg):
    """Where the embedded default backbone of this config lives (made or not) and the recipe it is made with."""
    recipe = {'model': models.vit_kwargs(cfg['model']), 'mae': cfg['mae'], 'bootstrap': cfg['backbone']['bootstrap'],
              'seed': cfg['run']['seed'], 'normalise': [cfg['data']['mean'], cfg['data']['std']],
              'data': synthetic.GENERATOR_VERSION}
    name = 'backbone-' + hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:10]
    return Path(cfg['run']['cache_dir']) / name / 'backbone.pth', recipe


def resolve(cfg):
    """Path of the backbone checkpoint: backbone.checkpoint, or the embedded default, made here once and cached."""
    if cfg['backbone']['checkpoint']:
        path = Path(cfg['backbone']['checkpoint'])
        if not path.is_file():
            raise FileNotFoundError(f'backbone.checkpoint: {path} does not exist')
        return path
    path, recipe = default_path(cfg)
    if not path.is_file():
        pretrain(cfg, path, recipe)
    return path


def pretrain(cfg, path, recipe):
    """MAE pre-training of every parameter (but the fixed position embeddings) on the upstream images."""
    boot = cfg['backbone']['bootstrap']
    boot_cfg = copy.deepcopy(cfg)
    boot_cfg['run']['out_dir'] = str(path.parent.parent)
    resume = (path.parent / 'checkpoint.pth').is_file()        # an interrupted bootstrap continues where it stopped
    run = engine.Run(boot_cfg, path.parent.name, resume, replace=True)   # (one that crashed before it restarts)
    run.log(f'no backbone.checkpoint configured: pre-training the embedded default backbone with MAE on '
            f'{boot["images"]} synthetic upstream images (once; cached as {path})')
    mae = models.build_mae(cfg).to(run.device)
    lora.mark_trainable(mae, extra=[p for p in mae.parameters() if p.requires_grad])  # all but the fixed pos embeds
    train_mae(run, mae, upstream_dataset(cfg), boot, tag='bootstrap')
    if run.main:
        engine.atomic_save({'model': mae.state_dict(), 'recipe': recipe}, path)
    run.barrier()
    run.close()


def main(args):
    cfg = engine.load_config(args.config, args.set)
    path = resolve(cfg)
    print(f'backbone: {path}', flush=True)
    return path


if __name__ == '__main__':
    main(engine.parse_args(__doc__))
