"""Stage 0: the pre-trained backbone that TPP adapts. MAE pre-training of a whole ViT on upstream images.

    python pretrain_backbone.py --config config.yaml [--set key=value ...]

With an official MAE checkpoint (backbone.checkpoint) there is nothing to do here: the other stages load it. With
backbone.checkpoint null they call `resolve(cfg)`, which returns the embedded default: every parameter of the MAE
(encoder and decoder) trained on synthetic *upstream* images, natural textures and other modalities' looks, a
different appearance from the downstream data (domain shift, as ImageNet is to CT). The default config's backbone is
shipped in weights/ (made by this script; weights/README.md); any other recipe is trained here once and cached in
run.cache_dir. The name is a hash of everything that shapes the weights, so a changed recipe trains a new backbone
instead of reusing a stale one. The training is engine.train_mae, as stage 1's, with every parameter trainable;
checkpoints.py loads the result (and any other backbone checkpoint) into the models.
"""
import copy
import hashlib
import json
from pathlib import Path

import config
import data
import engine
import lora
import models
import runs
import synthetic


def upstream_dataset(cfg):
    """The synthetic upstream images as a SliceDataset (8-bit grey / 255, then data.mean / data.std), without
    augmentation: the recipe of the shipped backbones."""
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
    with runs.Run(boot_cfg, path.parent.name, resume, fixed=(), stage='bootstrap',
                    resumed_by='the same command (stage 0 resumes by itself)') as run:
        run.log(f'no backbone.checkpoint configured: pre-training the embedded default backbone with MAE on '
                f'{boot["images"]} synthetic upstream images (once; cached as {path})')
        mae = models.build_mae(cfg).to(run.device)
        lora.mark_trainable(mae, extra=[p for p in mae.parameters() if p.requires_grad])  # all but the fixed pos embeds
        engine.train_mae(run, mae, upstream_dataset(cfg), boot, tag='bootstrap')
        if run.main:
            runs.atomic_save({'model': mae.state_dict(), 'recipe': recipe}, path)


def main(args):
    cfg = config.load_config(args.config, args.set, stage=0)
    runs.preflight(cfg)
    path = resolve(cfg)
    print(f'backbone: {path}', flush=True)
    return path


if __name__ == '__main__':
    runs.cli(main, __doc__)
