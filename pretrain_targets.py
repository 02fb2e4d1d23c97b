"""Stage 1 of TPP: pre-train the PEFT target parameters with a self-supervised pretext (pretrain.pretext: mae | dino).

    python pretrain_targets.py --config config.yaml [--set key=value ...] [--resume]

1. build the pretext model (the pre-trained backbone plus the MAE decoder or the DINO head) and load the backbone
2. insert the targets (LoRA / adapters / prompt tokens) into the encoder blocks
3. freeze the backbone explicitly: only the targets and the pretext head (the decoder if pretrain.train_decoder) train
4. train them with the pretext loss on the downstream training images; labels are never read
5. save only the targets, with what they were pre-trained for: <run.out_dir>/<pretrain.name>/targets.pth

With no backbone.checkpoint configured, the embedded default backbone is made first (once, cached; see
pretrain_backbone.py): the same MAE training with every parameter trainable, on upstream images.
"""
import copy

import torch
from torchvision.utils import make_grid, save_image

import config
import data
import engine
import lora
import models
from pretrain_backbone import load_checkpoint, resolve, train_mae


def trainable_decoder(model):
    """The MAE decoder's parameters that require grad (its fixed pos_embed never does)."""
    return [p for n, p in model.named_parameters() if models.is_decoder_key(n) and p.requires_grad]


def insert_targets(model, cfg):
    """Insert the targets into the encoder and freeze everything else explicitly: only the targets and the pretext
    head (the DINO head; the MAE decoder with pretrain.train_decoder) train. Returns lora.mark_trainable's counts."""
    if isinstance(model, models.TaskModel):
        lora.inject(model.backbone, cfg['peft'])
        return lora.mark_trainable(model, extra=model.head.parameters())
    lora.inject(model, cfg['peft'])
    return lora.mark_trainable(model, extra=trainable_decoder(model) if cfg['pretrain']['train_decoder'] else ())


class SelfDistillation(torch.nn.Module):
    """DINO with the backbone frozen. The student is backbone + targets + DINOHead; the teacher is the same backbone
    (shared: deepcopy's memo maps it to itself) with its own targets and head, exponential moving averages of the
    student's (update_teacher, after each optimiser step), kept as buffers: checkpoints hold them, the optimiser not."""

    def __init__(self, student, teacher_temp, student_temp, center_momentum, ema):
        super().__init__()
        self.student = student
        self.teacher = copy.deepcopy(student, {id(p): p for p in student.parameters() if not p.requires_grad})
        for module in self.teacher.modules():   # the teacher's targets and head: buffers named as the student's
            for name, p in list(module.named_parameters(recurse=False)):
                if p.requires_grad:
                    delattr(module, name)
                    module.register_buffer(name, p.detach())
        self.register_buffer('center', torch.zeros(student.head.last_layer.out_features))   # (K,)
        self.temps, self.center_momentum, self.ema = (teacher_temp, student_temp), center_momentum, ema

    def forward(self, views):
        """views: V x (B, C, H, W) of one batch -> mean cross-entropy of teacher view i and student view j != i."""
        x, V = torch.cat(views), len(views)
        s = (self.student(x).float() / self.temps[1]).log_softmax(dim=-1).chunk(V)           # V x (B, K)
        with torch.no_grad():
            out = self.teacher.eval()(x).float()                         # (V*B, K); eval: no dropout in the teacher
            t = ((out - self.center) / self.temps[0]).softmax(dim=-1).chunk(V)                # centred, sharpened
            self.center.mul_(self.center_momentum).add_(out.mean(dim=0), alpha=1 - self.center_momentum)
        return sum(-(t[i] * s[j]).sum(-1).mean() for i in range(V) for j in range(V) if i != j) / (V * (V - 1))

    @torch.no_grad()
    def update_teacher(self):
        """teacher = ema * teacher + (1 - ema) * student, for the targets and the head; the backbone is shared."""
        for name, p in self.student.named_parameters():
            if p.requires_grad:
                self.teacher.get_buffer(name).mul_(self.ema).add_(p, alpha=1 - self.ema)


def train_dino(run, student, dataset, cfg):
    """DINO training of the student's targets and head, on `views` random views of each training image."""
    d = cfg['dino']
    dino = SelfDistillation(student, d['teacher_temp'], d['student_temp'], d['center_momentum'], d['ema'])
    loader = engine.make_loader(run, dataset, cfg['pretrain']['batch_size'], train=True)
    loss_fn = lambda model, batch: model([data.random_views(batch['image'], cfg['data'], d['crop_scale'])
                                          for _ in range(d['views'])])
    return engine.train(run, dino.to(run.device), loader, loss_fn, cfg['pretrain'], tag='pretrain',
                        after_step=SelfDistillation.update_teacher)


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
    cfg = config.load_config(args.config, args.set)
    pcfg, dcfg = cfg['pretrain'], cfg['data']
    if pcfg['pretext'] not in ('mae', 'dino') or cfg['dino']['views'] < 2:
        raise config.ConfigError(f"pretrain.pretext: {pcfg['pretext']!r} must be mae or dino (dino: dino.views >= 2)")
    dino = pcfg['pretext'] == 'dino'
    if pcfg['decoder_warmup_steps'] and (dino or not pcfg['train_decoder']):
        raise config.ConfigError('pretrain.decoder_warmup_steps: only for pretext mae with train_decoder: true')
    cases, info = data.prepare(dcfg, cfg['run']['cache_dir'], in_chans=cfg['model']['in_chans'])  # checked first:
    cfg['model']['in_chans'] = info['in_chans']                  # stage 0 can take minutes; the model follows the data
    models.build_head(cfg, num_classes=2)                        # stage 2's head must fit this backbone too
    backbone_path = resolve(cfg)                                 # stage 0 (once, cached) unless a checkpoint is set
    run = engine.Run(cfg, pcfg['name'], args.resume, result='targets.pth')   # the folder is made when training starts
    run.log(f"data.intensity {info['intensity']}")
    run.log(f"model.in_chans {info['channels']}")
    train_cases = data.split_cases(cases, dcfg)['train']        # every training case; validation/test stay unseen
    arch = models.vit_kwargs(cfg['model'])
    size, chans = arch['img_size'], arch['in_chans']
    dataset = data.SliceDataset(train_cases, dcfg, size, chans, task=None, train=True)

    model = (models.build_dino(cfg) if dino else models.build_mae(cfg)).to(run.device)
    encoder = model.backbone if dino else model                  # the ViT that takes the targets
    run.log(load_checkpoint(encoder, backbone_path, need_decoder=not (dino or pcfg['train_decoder'])))   # (+ decoder)
    fingerprint = lora.backbone_fingerprint(encoder)             # identifies the backbone the targets belong to

    # --- TPP: insert the targets into the encoder and freeze everything else explicitly
    counts = insert_targets(model, cfg)
    head = ' + DINO head' if dino else ' + decoder' if pcfg['train_decoder'] else ''
    run.log(f"parameters: total {counts['total']:,} | targets {counts['targets']:,} ({counts['targets_pct']:.2f}%) | "
            f"trainable {counts['trainable']:,} (targets{head}) | pretext {pcfg['pretext']} | "
            f'{len(dataset)} training slices from {len(train_cases)} cases')

    # --- TPP: the pretext task on the downstream images
    warm = pcfg['decoder_warmup_steps']          # the decoder trains for these steps, then only the targets adapt
    warm = (warm, trainable_decoder(model)) if warm else None
    result = train_dino(run, model, dataset, cfg) if dino else train_mae(run, model, dataset, pcfg, 'pretrain', warm)
    pretext = {'name': 'dino', **cfg['dino']} if dino else {'name': 'mae', 'mask_ratio': pcfg['mask_ratio'],
               'norm_pix_loss': cfg['mae']['norm_pix_loss'], 'train_decoder': pcfg['train_decoder'],
               'decoder_warmup_steps': pcfg['decoder_warmup_steps']}

    # --- TPP: save only the targets, with what they were pre-trained for (stage 2 checks it)
    meta = {'arch': arch, 'peft': lora.structure(encoder), 'backbone': fingerprint,
            'backbone_checkpoint': str(backbone_path), 'steps': result['steps'],
            'final_loss': result['history'][-1]['train_loss'],
            'pretext': {**pretext, 'epochs': pcfg['epochs'], 'data': dcfg['layout']}}
    targets_path = run.dir / 'targets.pth'
    if run.main:
        engine.atomic_save({'targets': lora.target_state_dict(encoder), 'meta': meta}, targets_path)
        if not dino:
            grid = data.SliceDataset(train_cases, dcfg, size, chans, task=None, train=False)
            images = torch.stack([grid[i]['image'] for i in range(min(pcfg['grid_images'], len(grid)))])
            save_reconstructions(run, model, images.to(run.device), pcfg['mask_ratio'], dcfg)
        run.log(f'targets: {targets_path} ({targets_path.stat().st_size / 2 ** 20:.2f} MiB; backbone '
                f'{backbone_path.stat().st_size / 2 ** 20:.1f} MiB) | TensorBoard'
                f'{"" if dino else " and reconstructions.png"}: {run.dir}')
    run.close()
    return targets_path


if __name__ == '__main__':
    engine.cli(main, __doc__)
