"""DINO as the pretext of stage 1 (pretrain.pretext: dino): self-distillation of the targets, the backbone frozen.

The student is backbone + targets + DINOHead on the cls token (build_student); the teacher is an exponential moving
average of the student's targets and head (SelfDistillation); both see multi-crop views (multi_crop). The official
recipe's schedules are pure functions of the optimiser step: the teacher temperature's warm-up and the momentum's
cosine rise to 1. pretrain_targets.pretrain_dino trains it with engine.train.
"""
import copy
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import data
import lora
import models


class DINOHead(nn.Module):
    """DINO's projection head: a 3-layer MLP on the cls token, an L2-normalised bottleneck, then a linear layer with
    unit-norm rows (the official weight norm with its gain fixed to 1) to out_dim prototype scores."""

    def __init__(self, in_dim, out_dim=65536, hidden_dim=2048, bottleneck_dim=256):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, hidden_dim),
                                 nn.GELU(), nn.Linear(hidden_dim, bottleneck_dim))
        self.last_layer = nn.Linear(bottleneck_dim, out_dim, bias=False)
        self.mlp.apply(models._init_linear_and_norm)  # as the encoder (DINO: truncated normal, std 0.02)

    def forward(self, tokens):
        """tokens: (B, 1+L, D) after the final norm -> scores (B, out_dim)."""
        x = F.normalize(self.mlp(tokens[:, 0]), dim=-1)  # (B, bottleneck_dim) on the unit sphere
        return F.linear(x, F.normalize(self.last_layer.weight, dim=-1))


def build_student(cfg):
    """The DINO student: TaskModel(backbone, DINOHead) with the head sizes of the config's `dino:` section."""
    head = {k: cfg['dino'][k] for k in ('out_dim', 'hidden_dim', 'bottleneck_dim')}
    backbone = models.build_backbone(cfg)
    return models.TaskModel(backbone, DINOHead(backbone.embed_dim, **head))


def teacher_temp_at(step, warmup_steps, warmup_temp, temp):
    """DINO's teacher temperature: linear from warmup_temp at step 0 to temp at warmup_steps, then temp."""
    return temp if step >= warmup_steps else warmup_temp + (temp - warmup_temp) * step / warmup_steps


def momentum_at(step, total, ema):
    """DINO's teacher momentum: a cosine from `ema` at the first optimiser step to 1 at the last (step total - 1)."""
    return 1 - (1 - ema) * 0.5 * (1 + math.cos(math.pi * step / max(1, total - 1)))


class SelfDistillation(nn.Module):
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
