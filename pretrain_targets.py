"""Stage 1 of TPP: pre-train the PEFT target parameters with a self-supervised pretext (pretrain.pretext: mae | dino)
on the downstream training images, the backbone frozen, and save only the targets for stage 2:
<run.out_dir>/<pretrain.name>/targets.pth. main reads as the method's steps (the `# --- TPP:` lines).

    python pretrain_targets.py --config config.yaml [--set key=value ...] [--resume]

With no backbone.checkpoint configured, the embedded default backbone is made first (once, cached; see
pretrain_backbone.py): the same MAE training with every parameter trainable, on upstream images.
"""
import torch
from torchvision.utils import make_grid, save_image

import config
import data
import dino
import engine
import lora
import models
import runs
from checkpoints import load_checkpoint
from pretrain_backbone import resolve


def trainable_decoder(model):
    """The MAE decoder's parameters that require grad (its fixed pos_embed never does)."""
    return [p for n, p in model.named_parameters() if models.is_decoder_key(n) and p.requires_grad]


def freeze_backbone(model, cfg):
    """Freeze everything explicitly but the targets and the pretext head (the DINO head; the MAE decoder with
    pretrain.train_decoder), which train. Returns lora.mark_trainable's counts."""
    if isinstance(model, models.TaskModel):
        return lora.mark_trainable(model, extra=model.head.parameters())
    return lora.mark_trainable(model, extra=trainable_decoder(model) if cfg['pretrain']['train_decoder'] else ())


def pretrain_dino(run, student, dataset, cfg):
    """DINO training of the student's targets and head on multi-crop views of each training image (dino.py). Returns
    engine.train's result (its history holds SelfDistillation.epoch_stats), the targets dino.save names (the
    teacher's, which DINO evaluates, or the student's) and the pretext's settings for targets.pth."""
    d, img_size = cfg['dino'], student.backbone.arch['img_size']
    loader = engine.make_loader(run, dataset, cfg['pretrain']['batch_size'], train=True)
    distill = dino.SelfDistillation(student, d, len(loader), cfg['pretrain']['epochs']).to(run.device)
    loss_fn = lambda model, batch: model(dino.multi_crop(batch['image'], cfg['data'], d, img_size))
    result = engine.train(run, distill, loader, loss_fn, cfg['pretrain'], tag='pretrain',
                          evaluate=dino.SelfDistillation.epoch_stats,
                          before_step=dino.SelfDistillation.freeze_last_layer,
                          after_step=dino.SelfDistillation.update_teacher)
    return result, distill.target_state_dict(d['save']), {'name': 'dino', **d}


def pretrain_mae(run, mae, dataset, cfg):
    """MAE training of the targets (and of the decoder with pretrain.train_decoder, for its first
    pretrain.decoder_warmup_steps steps only when set), then rank 0's reconstructions.png. Returns engine.train's
    result, the targets and the pretext's settings for targets.pth."""
    pcfg, warm = cfg['pretrain'], cfg['pretrain']['decoder_warmup_steps']
    result = engine.train_mae(run, mae, dataset, pcfg, 'pretrain', (warm, trainable_decoder(mae)) if warm else None)
    if run.main:
        grid = data.SliceDataset(dataset.cases, dataset.dcfg, dataset.size, dataset.in_chans, task=None, train=False)
        images = torch.stack([grid[i]['image'] for i in range(min(pcfg['grid_images'], len(grid)))])
        save_reconstructions(run, mae, images.to(run.device), pcfg['mask_ratio'], cfg['data'])
    return result, lora.target_state_dict(mae), {
        'name': 'mae', 'mask_ratio': pcfg['mask_ratio'], 'norm_pix_loss': cfg['mae']['norm_pix_loss'],
        'train_decoder': pcfg['train_decoder'], 'decoder_warmup_steps': warm}


@torch.no_grad()
def save_reconstructions(run, mae, images, mask_ratio, dcfg):
    """PNG grid (and TensorBoard image): masked input / reconstruction (visible patches pasted back) / original."""
    mae.eval()
    noise = torch.rand(len(images), mae.patch_embed.num_patches, generator=torch.Generator().manual_seed(0))
    with run.autocast():
        _, pred, mask = mae(images, mask_ratio, noise=noise.to(images.device))   # (B, L, p*p*C), (B, L)
    pred = mae.pixels(pred.float(), images)          # norm_pix_loss: each original patch's statistics undone
    mask = mae.unpatchify(mask[..., None].expand_as(pred))                           # (B, C, H, W), 1 = removed
    recon = images * (1 - mask) + mae.unpatchify(pred) * mask
    rows = [data.unnormalize(x, dcfg) for x in (images * (1 - mask), recon, images)]   # back to [0, 1]
    if images.shape[1] != 3:                                                          # grey, or the first sequence
        rows = [x[:, :1] for x in rows]
    grid = make_grid(torch.cat(rows).clamp(0, 1).cpu(), nrow=len(images), padding=1)
    save_image(grid, run.dir / 'reconstructions.png')
    run.writer.add_image('pretrain/masked_recon_original', grid, 0)


def check(cfg):
    """Every check of stage 1, before anything is written and before stage 0 (which can take minutes): the folders,
    device and AMP, the targets' layers, the segmentation decoder stage 2 will put on this backbone, the data.
    Returns data.prepare's (cases, info)."""
    runs.preflight(cfg)
    lora.check_layers(cfg)
    if cfg['finetune']['task'] == 'segmentation':   # its patch size and depth rules, on the meta device (no memory)
        with torch.device('meta'):
            models.build_head(cfg, num_classes=2)
    return data.prepare(cfg['data'], cfg['run']['cache_dir'], in_chans=cfg['model']['in_chans'])


def main(args):
    cfg = config.load_config(args.config, args.set, stage=1)
    pcfg, dcfg, is_dino = cfg['pretrain'], cfg['data'], cfg['pretrain']['pretext'] == 'dino'
    cases, info = check(cfg)
    cfg['data']['intensity'], cfg['model']['in_chans'] = info['modes'], info['in_chans']   # the config follows the data
    backbone_path = resolve(cfg)                                 # stage 0 (once, cached) unless a checkpoint is set
    with runs.Run(cfg, pcfg['name'], args.resume, result='targets.pth', stage='pretrain') as run:
        for line in (f"data.intensity {info['intensity']}", f"model.in_chans {info['channels']}",
                     *data.warning_lines(info['warnings'])):
            run.log(line)
        model = (dino.build_student(cfg) if is_dino else models.build_mae(cfg)).to(run.device)
        encoder = model.backbone if is_dino else model               # the ViT that takes the targets
        run.log(load_checkpoint(encoder, backbone_path,   # a frozen decoder must come with the backbone
                                need_decoder=not (is_dino or pcfg['train_decoder'])))
        fingerprint = lora.backbone_fingerprint(encoder)             # identifies the backbone the targets belong to
        train_cases = data.split_cases(cases, dcfg)['train']        # every training case; validation/test stay unseen
        dataset = data.SliceDataset(train_cases, dcfg, encoder.arch['img_size'], encoder.arch['in_chans'], task=None,
                                    train=True)

        # --- TPP: insert the targets (LoRA / adapters / prompt tokens) into the encoder blocks
        lora.inject(encoder, cfg['peft'])
        # --- TPP: freeze the backbone explicitly: only the targets and the pretext head train
        counts = freeze_backbone(model, cfg)
        head = ' + DINO head' if is_dino else ' + decoder' if pcfg['train_decoder'] else ''
        run.log(f"parameters: total {counts['total']:,} | targets {counts['targets']:,} "
                f"({counts['targets_pct']:.2f}%) | trainable {counts['trainable']:,} (targets{head}) | "
                f"pretext {pcfg['pretext']} | {len(dataset)} training slices from {len(train_cases)} cases")
        # --- TPP: pretext training of the targets on the downstream training images (labels are never read)
        result, targets, pretext = (pretrain_dino if is_dino else pretrain_mae)(run, model, dataset, cfg)
        # --- TPP: keep only the targets, with what they were pre-trained for; stage 2 loads them and checks it
        meta = {'arch': encoder.arch, 'peft': lora.structure(encoder), 'backbone': fingerprint,
                'backbone_checkpoint': str(backbone_path), 'steps': result['steps'],
                'final_loss': result['history'][-1]['train_loss'],
                'pretext': {**pretext, 'epochs': pcfg['epochs'], 'data': dcfg['layout']},
                'data': data.describe(info, train_cases)}   # stage 2 warns when it fine-tunes on other data
        path = run.dir / 'targets.pth'
        if run.main:   # last: targets.pth marks the run finished (a failure before it leaves a run --resume completes)
            runs.atomic_save({'targets': targets, 'meta': meta}, path)
            run.log(f'targets: {path} ({path.stat().st_size / 2 ** 20:.2f} MiB; backbone '
                    f'{backbone_path.stat().st_size / 2 ** 20:.1f} MiB) | TensorBoard'
                    f'{"" if is_dino else " and reconstructions.png"}: {run.dir}')
    return path


if __name__ == '__main__':
    runs.cli(main, __doc__)
