"""Stage 1 of TPP: pre-train the PEFT target parameters with masked-autoencoder reconstruction.

    python pretrain_targets.py --config config.yaml [--set key=value ...] [--resume]

1. build the MAE (encoder = the pre-trained backbone, plus the pretext decoder) and load the backbone checkpoint
2. insert the targets (LoRA / adapters) into the encoder blocks
3. freeze the backbone explicitly: only the targets (and the decoder, if pretrain.train_decoder) are trained
4. train them with the MAE loss on the downstream training images; labels are never read
5. save only the targets, with what they were pre-trained for: <run.out_dir>/<pretrain.name>/targets.pth

With no backbone.checkpoint configured, the embedded default backbone is made first (once, cached; see
pretrain_backbone.py): the same MAE training with every parameter trainable, on upstream images.
"""
import torch
from torchvision.utils import make_grid, save_image

import data
import engine
import lora
import models
from pretrain_backbone import load_checkpoint, resolve, train_mae


def insert_targets(mae, cfg):
    """Insert the targets into the encoder and freeze everything else explicitly: only the targets (and the decoder,
    with pretrain.train_decoder) train. Returns lora.mark_trainable's parameter counts."""
    lora.inject(mae, cfg['peft'])
    decoder = [p for n, p in mae.named_parameters() if models.is_decoder_key(n) and p.requires_grad]
    return lora.mark_trainable(mae, extra=decoder if cfg['pretrain']['train_decoder'] else ())


@torch.no_grad()
def save_reconstructions(run, mae, images, mask_ratio, dcfg):
    """PNG grid (and TensorBoard image): masked input / reconstruction (visible patches pasted back) / original."""
    mae.eval()
    noise = torch.rand(len(images), mae.patch_embed.num_patches, generator=torch.Generator().manual_seed(0))
    with run.autocast():
        _, pred, mask = mae(images, mask_ratio, noise=noise.to(images.device))   # (B, L, p*p*C), (B, L)
    pred = pred.float()
    if mae.norm_pix_loss:   # the decoder predicts normalised patches: undo with each original patch's statistics
        target = mae.patchify(images)
        pred = pred * (target.var(-1, keepdim=True) + 1e-6) ** 0.5 + target.mean(-1, keepdim=True)
    mask = mae.unpatchify(mask[..., None].expand_as(pred))                           # (B, C, H, W), 1 = removed
    recon = images * (1 - mask) + mae.unpatchify(pred) * mask
    mean = torch.tensor(dcfg['mean'], device=images.device).view(1, -1, 1, 1)
    std = torch.tensor(dcfg['std'], device=images.device).view(1, -1, 1, 1)
    rows = [x * std + mean for x in (images * (1 - mask), recon, images)]            # back to [0, 1]
    grid = make_grid(torch.cat(rows).clamp(0, 1).cpu(), nrow=len(images), padding=1)
    save_image(grid, run.dir / 'reconstructions.png')
    run.writer.add_image('pretrain/masked_recon_original', grid, 0)


def main(args):
    cfg = engine.load_config(args.config, args.set)
    pcfg, dcfg = cfg['pretrain'], cfg['data']
    cases, _ = data.prepare(dcfg, cfg['run']['cache_dir'])     # checked first: stage 0 can take minutes
    models.build_head(cfg, num_classes=2)                        # stage 2's head must fit this backbone too
    backbone_path = resolve(cfg)                                 # stage 0 (once, cached) unless a checkpoint is set
    run = engine.Run(cfg, pcfg['name'], args.resume, result='targets.pth')   # the folder is made when training starts
    train_cases = data.split_cases(cases, dcfg)['train']        # every training case; validation/test stay unseen
    arch = models.vit_kwargs(cfg['model'])
    size, chans = arch['img_size'], arch['in_chans']
    dataset = data.SliceDataset(train_cases, dcfg, size, chans, task=None, train=True)

    mae = models.build_mae(cfg).to(run.device)
    run.log(load_checkpoint(mae, backbone_path, need_decoder=not pcfg['train_decoder']))   # encoder (+ decoder)
    fingerprint = lora.backbone_fingerprint(mae)                 # identifies the backbone the targets belong to

    # --- TPP: insert the targets into the encoder and freeze everything else explicitly
    counts = insert_targets(mae, cfg)
    run.log(f"parameters: total {counts['total']:,} | targets {counts['targets']:,} ({counts['targets_pct']:.2f}%) | "
            f"trainable {counts['trainable']:,} (targets{' + decoder' if pcfg['train_decoder'] else ''}) | "
            f'{len(dataset)} training slices from {len(train_cases)} cases')

    # --- TPP: the pretext task on the downstream images
    result = train_mae(run, mae, dataset, pcfg, tag='pretrain')

    # --- TPP: save only the targets, with what they were pre-trained for (stage 2 checks it)
    meta = {'arch': arch, 'peft': lora.structure(mae), 'backbone': fingerprint,
            'backbone_checkpoint': str(backbone_path), 'steps': result['steps'],
            'pretext': {'mask_ratio': pcfg['mask_ratio'], 'norm_pix_loss': cfg['mae']['norm_pix_loss'],
                        'train_decoder': pcfg['train_decoder'], 'epochs': pcfg['epochs'], 'data': dcfg['layout']}}
    targets_path = run.dir / 'targets.pth'
    if run.main:
        engine.atomic_save({'targets': lora.target_state_dict(mae), 'meta': meta}, targets_path)
        grid = data.SliceDataset(train_cases, dcfg, size, chans, task=None, train=False)
        images = torch.stack([grid[i]['image'] for i in range(min(pcfg['grid_images'], len(grid)))])
        save_reconstructions(run, mae, images.to(run.device), pcfg['mask_ratio'], dcfg)
        run.log(f'targets: {targets_path} ({targets_path.stat().st_size / 2 ** 20:.2f} MiB; backbone '
                f'{backbone_path.stat().st_size / 2 ** 20:.1f} MiB) | reconstructions: {run.dir}/reconstructions.png | '
                f'TensorBoard: {run.dir}/tensorboard')
    run.close()
    return targets_path


if __name__ == '__main__':
    main(engine.parse_args(__doc__))
