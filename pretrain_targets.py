"""Stage 1 of TPP: pre-train the PEFT target parameters with a self-supervised pretext (pretrain.pretext: mae | dino)
on the downstream training images, the backbone frozen, and save only the targets for stage 2:
<run.out_dir>/<pretrain.name>/targets.pth. main reads as the method's steps (the `# --- TPP:` lines).

    python pretrain_targets.py --config config.yaml [--set key=value ...] [--resume]

With no backbone.checkpoint configured, the embedded default backbone is made first (once, cached; see
pretrain_backbone.py): the same MAE training with every parameter trainable, on upstream images.
"""
import copy
import math

import torch
from torchvision.utils import make_grid, save_image

import config
import data
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


def teacher_temp_at(step, warmup_steps, warmup_temp, temp):
    """DINO's teacher temperature: linear from warmup_temp at step 0 to temp at warmup_steps, then temp."""
    return temp if step >= warmup_steps else warmup_temp + (temp - warmup_temp) * step / warmup_steps


def momentum_at(step, total, ema):
    """DINO's teacher momentum: a cosine from `ema` at the first optimiser step to 1 at the last (step total - 1)."""
    return 1 - (1 - ema) * 0.5 * (1 + math.cos(math.pi * step / max(1, total - 1)))


class SelfDistillation(torch.nn.Module):
    """DINO with the backbone frozen. The student is backbone + targets + DINOHead; the teacher is the same backbone
    (shared: deepcopy's memo maps it to itself) with its own targets and head, exponential moving averages of the
    student's (update_teacher, after each optimiser step), kept as buffers: checkpoints hold them, the optimiser not.
    The schedules are pure functions of the optimiser step, a buffer too, so a resumed run continues them exactly:
    the teacher temperature warms up, the momentum rises to 1, the last layer is frozen for the first epochs.
    `d` is the config's dino: section; `steps_per_epoch` and `epochs` place the schedules."""

    def __init__(self, student, d, steps_per_epoch, epochs):
        super().__init__()
        self.student = student
        self.teacher = copy.deepcopy(student, {id(p): p for p in student.parameters() if not p.requires_grad})
        for module in self.teacher.modules():   # the teacher's targets and head: buffers named as the student's
            for name, p in list(module.named_parameters(recurse=False)):
                if p.requires_grad:
                    delattr(module, name)
                    module.register_buffer(name, p.detach())
        self.register_buffer('center', torch.zeros(student.head.last_layer.out_features))   # (K,)
        self.register_buffer('step', torch.zeros((), dtype=torch.long))   # optimiser steps taken
        self.d, self.total = d, steps_per_epoch * epochs
        self.warmup_steps = d['warmup_teacher_temp_epochs'] * steps_per_epoch
        self.frozen_steps = d['freeze_last_layer'] * steps_per_epoch
        self.stats, self.batches = 0, 0   # epoch sums of the teacher's entropy and the loss, for epoch_stats

    def forward(self, views):
        """views: 2 global (B, C, S, S) then any local (B, C, s, s) crops of one batch -> the mean cross-entropy of
        teacher view i (global only) and student view j != i (all)."""
        local = [torch.cat(views[2:])] if len(views) > 2 else []    # other size: its own pass (pos_embed resized)
        s = torch.cat([self.student(x) for x in [torch.cat(views[:2]), *local]])
        s = (s.float() / self.d['student_temp']).log_softmax(dim=-1).chunk(len(views))      # V x (B, K)
        with torch.no_grad():
            out = self.teacher.eval()(torch.cat(views[:2])).float()       # (2B, K); eval: no dropout in the teacher
            temp = teacher_temp_at(self.step.item(), self.warmup_steps, self.d['warmup_teacher_temp'],
                                   self.d['teacher_temp'])
            log_t = ((out - self.center) / temp).log_softmax(dim=-1)     # centred, sharpened
            t = log_t.exp()
            entropy = -(t * log_t).sum(-1).mean()                         # of the teacher's targets, in nats
            t = t.chunk(2)
            m = self.d['center_momentum']
            self.center.mul_(m).add_(out.mean(dim=0), alpha=1 - m)
        pairs = [(i, j) for i in range(2) for j in range(len(views)) if i != j]
        loss = sum(-(t[i] * s[j]).sum(-1).mean() for i, j in pairs) / len(pairs)
        self.stats, self.batches = self.stats + torch.stack([entropy, loss.detach()]), self.batches + 1
        return loss

    def freeze_last_layer(self):
        """DINO's last-layer freeze: before the optimiser step of the first dino.freeze_last_layer epochs, the head's
        last layer loses its gradient, so the optimiser leaves it as it is (no decay, no moments)."""
        if self.step.item() < self.frozen_steps:
            self.student.head.last_layer.weight.grad = None

    @torch.no_grad()
    def update_teacher(self):
        """teacher = m * teacher + (1 - m) * student for the targets and the head (the backbone is shared), m on
        DINO's cosine schedule from dino.ema to 1; then counts the step."""
        m = momentum_at(self.step.item(), self.total, self.d['ema'])
        for name, p in self.student.named_parameters():
            if p.requires_grad:
                self.teacher.get_buffer(name).mul_(m).add_(p, alpha=1 - m)
        self.step += 1

    def epoch_stats(self):
        """The means since the last call (an epoch): the teacher's entropy in nats, and it and the loss relative to
        log K, the entropy of the uniform distribution over the K prototypes (1: the teacher says nothing)."""
        entropy, loss = (self.stats / self.batches).tolist()
        log_k = math.log(self.center.numel())
        self.stats, self.batches = 0, 0
        return {'teacher_entropy': entropy, 'teacher_entropy_rel': entropy / log_k, 'loss_rel': loss / log_k}

    def target_state_dict(self, who):
        """The targets of the 'teacher' or the 'student', named as the student encoder's (lora.target_state_dict)."""
        state = (self.teacher if who == 'teacher' else self.student).backbone.state_dict()
        return {name: state[name].detach().clone() for name, _ in lora.target_parameters(self.student.backbone)}


def multi_crop(images, dcfg, d, img_size):
    """DINO's views of a normalised batch (B, C, S, S): 2 global crops (dino.global_crops_scale, S pixels) and
    dino.local_crops local ones (dino.local_crops_scale, dino.local_crop_size pixels), each with DINO's per-view
    photometric augmentation: blur always on the first global crop, rarely on the second, which is solarised one time
    in five; half the local crops blurred. DINO's blur sigma of 0.1-2 pixels on 224-pixel crops is scaled to S."""
    sigma = (0.1 * img_size / 224, 2.0 * img_size / 224)
    views = [data.grey_photometric(data.random_views(images, dcfg, d['global_crops_scale']), dcfg, blur, solarize,
                                   sigma) for blur, solarize in ((1.0, 0.0), (0.1, 0.2))]
    return views + [data.grey_photometric(data.random_views(images, dcfg, d['local_crops_scale'],
                                                            d['local_crop_size']), dcfg, 0.5, 0.0, sigma)
                    for _ in range(d['local_crops'])]


def pretrain_dino(run, student, dataset, cfg):
    """DINO training of the student's targets and head on multi-crop views of each training image. Returns
    engine.train's result (its history holds SelfDistillation.epoch_stats), the targets dino.save names (the
    teacher's, which DINO evaluates, or the student's) and the pretext's settings for targets.pth."""
    d = cfg['dino']
    loader = engine.make_loader(run, dataset, cfg['pretrain']['batch_size'], train=True)
    dino = SelfDistillation(student, d, len(loader), cfg['pretrain']['epochs']).to(run.device)
    img_size = models.vit_kwargs(cfg['model'])['img_size']
    loss_fn = lambda model, batch: model(multi_crop(batch['image'], cfg['data'], d, img_size))
    result = engine.train(run, dino, loader, loss_fn, cfg['pretrain'], tag='pretrain',
                          evaluate=SelfDistillation.epoch_stats, before_step=SelfDistillation.freeze_last_layer,
                          after_step=SelfDistillation.update_teacher)
    return result, dino.target_state_dict(d['save']), {'name': 'dino', **d}


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
    pred = pred.float()
    if mae.norm_pix_loss:   # the decoder predicts normalised patches: undo with each original patch's statistics
        target = mae.patchify(images)
        pred = pred * (target.var(-1, keepdim=True) + 1e-6) ** 0.5 + target.mean(-1, keepdim=True)
    mask = mae.unpatchify(mask[..., None].expand_as(pred))                           # (B, C, H, W), 1 = removed
    recon = images * (1 - mask) + mae.unpatchify(pred) * mask
    mean, std = data.mean_std(images, dcfg)
    rows = [x * std + mean for x in (images * (1 - mask), recon, images)]            # back to [0, 1]
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
    pcfg, dcfg, dino = cfg['pretrain'], cfg['data'], cfg['pretrain']['pretext'] == 'dino'
    cases, info = check(cfg)
    cfg['model']['in_chans'] = info['in_chans']                  # the model follows the data
    backbone_path = resolve(cfg)                                 # stage 0 (once, cached) unless a checkpoint is set
    with runs.Run(cfg, pcfg['name'], args.resume, result='targets.pth', stage='pretrain') as run:
        for line in (f"data.intensity {info['intensity']}", f"model.in_chans {info['channels']}",
                     *data.warning_lines(info['warnings'])):
            run.log(line)
        train_cases = data.split_cases(cases, dcfg)['train']        # every training case; validation/test stay unseen
        arch = models.vit_kwargs(cfg['model'])
        dataset = data.SliceDataset(train_cases, dcfg, arch['img_size'], arch['in_chans'], task=None, train=True)
        model = (models.build_dino(cfg) if dino else models.build_mae(cfg)).to(run.device)
        encoder = model.backbone if dino else model                  # the ViT that takes the targets
        run.log(load_checkpoint(encoder, backbone_path,   # a frozen decoder must come with the backbone
                                need_decoder=not (dino or pcfg['train_decoder'])))
        fingerprint = lora.backbone_fingerprint(encoder)             # identifies the backbone the targets belong to

        # --- TPP: insert the targets (LoRA / adapters / prompt tokens) into the encoder blocks
        lora.inject(encoder, cfg['peft'])
        # --- TPP: freeze the backbone explicitly: only the targets and the pretext head train
        counts = freeze_backbone(model, cfg)
        head = ' + DINO head' if dino else ' + decoder' if pcfg['train_decoder'] else ''
        run.log(f"parameters: total {counts['total']:,} | targets {counts['targets']:,} "
                f"({counts['targets_pct']:.2f}%) | trainable {counts['trainable']:,} (targets{head}) | "
                f"pretext {pcfg['pretext']} | {len(dataset)} training slices from {len(train_cases)} cases")
        # --- TPP: pretext training of the targets on the downstream training images (labels are never read)
        result, targets, pretext = (pretrain_dino if dino else pretrain_mae)(run, model, dataset, cfg)
        # --- TPP: keep only the targets, with what they were pre-trained for; stage 2 loads them and checks it
        meta = {'arch': arch, 'peft': lora.structure(encoder), 'backbone': fingerprint,
                'backbone_checkpoint': str(backbone_path), 'steps': result['steps'],
                'final_loss': result['history'][-1]['train_loss'],
                'pretext': {**pretext, 'epochs': pcfg['epochs'], 'data': dcfg['layout']},
                'data': data.describe(info, train_cases)}   # stage 2 warns when it fine-tunes on other data
        path = run.dir / 'targets.pth'
        if run.main:   # last: targets.pth marks the run finished (a failure before it leaves a run --resume completes)
            runs.atomic_save({'targets': targets, 'meta': meta}, path)
            run.log(f'targets: {path} ({path.stat().st_size / 2 ** 20:.2f} MiB; backbone '
                    f'{backbone_path.stat().st_size / 2 ** 20:.1f} MiB) | TensorBoard'
                    f'{"" if dino else " and reconstructions.png"}: {run.dir}')
    return path


if __name__ == '__main__':
    runs.cli(main, __doc__)
