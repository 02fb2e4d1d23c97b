"""The DINO pretext (pretrain.pretext: dino): the teacher is an EMA of the student's targets and head only, the centre
is an EMA of the teacher's batch mean, the backbone never changes, and only the targets are saved for stage 2."""
import json
import math

import pytest
import torch

import config
import data
import engine
import finetune
import dino
import lora
import pretrain_targets
from conftest import args, tiny_config


def tiny_dino(tmp_path, cache, *overrides, steps_per_epoch=4, epochs=2):
    """The tiny config's stage-1 DINO model, targets inserted, backbone random (no checkpoint needed here)."""
    cfg = config.load_config(tiny_config(tmp_path, cache), ['pretrain.pretext=dino', *overrides])
    torch.manual_seed(0)
    student = dino.build_student(cfg)
    lora.inject(student.backbone, cfg['peft'])
    pretrain_targets.freeze_backbone(student, cfg)
    return cfg, dino.SelfDistillation(student, cfg['dino'], steps_per_epoch, epochs)


def views(local=1, batch=4):
    """2 global 32-pixel 'views' and `local` 16-pixel ones (random images suffice: the loss only needs batches of the
    same size)."""
    torch.manual_seed(1)
    return [torch.randn(batch, 1, 32, 32) for _ in range(2)] + [torch.randn(batch, 1, 16, 16) for _ in range(local)]


def test_dino_teacher_is_an_ema_of_the_students_targets_and_head_only(tmp_path, cache):
    cfg, distill = tiny_dino(tmp_path, cache)
    student, teacher = distill.student, distill.teacher
    trainable = {n for n, p in student.named_parameters() if p.requires_grad}
    heads = {n for n, _ in student.head.named_parameters(prefix='head')}
    assert trainable == {'backbone.' + n for n, _ in lora.target_parameters(student.backbone)} | heads
    assert {n for n, _ in teacher.named_buffers()} == trainable          # the teacher's copies of exactly those
    frozen = {n: p for n, p in student.named_parameters() if not p.requires_grad}
    assert all(p is frozen[n] for n, p in teacher.named_parameters())  # one backbone, shared
    with torch.no_grad():   # a teacher apart from the student, and LoRA B != 0 (else A gets no gradient)
        for b in teacher.buffers():
            b.normal_()
        for n in trainable:
            student.get_parameter(n).add_(torch.randn_like(student.get_parameter(n)), alpha=0.01)
    before = {n: b.clone() for n, b in teacher.named_buffers()}
    backbone = {n: p.clone() for n, p in frozen.items()}

    optimizer = torch.optim.SGD([p for p in student.parameters() if p.requires_grad], lr=0.5)
    distill(views()).backward()
    assert all((p.grad is not None) == p.requires_grad for p in distill.parameters())
    optimizer.step()
    distill.update_teacher()

    m, params = cfg['dino']['ema'], dict(student.named_parameters())   # the momentum at step 0
    assert distill.step.item() == 1
    for n, b in teacher.named_buffers():
        assert not torch.equal(params[n], before[n]), n                   # the student moved ...
        torch.testing.assert_close(b, m * before[n] + (1 - m) * params[n].detach(), rtol=1e-6, atol=1e-7)  # float32 eps
    assert all(torch.equal(p, backbone[n]) for n, p in frozen.items())   # the backbone is bit-identical


def test_dino_centre_is_an_ema_of_the_teachers_batch_mean(tmp_path, cache):
    cfg, distill = tiny_dino(tmp_path, cache)
    distill.center.normal_()
    center, x = distill.center.clone(), views(2)
    with torch.no_grad():
        batch_mean = distill.teacher(torch.cat(x[:2])).mean(dim=0)   # (K,) over both global views of every image
    distill(x)
    m = cfg['dino']['center_momentum']
    torch.testing.assert_close(distill.center, m * center + (1 - m) * batch_mean, rtol=0, atol=1e-6)


@pytest.mark.parametrize('step', [0, 5, 20])
def test_dino_loss_is_the_cross_entropy_of_each_global_teacher_view_with_every_other_student_view(tmp_path, cache,
                                                                                               step):
    cfg, distill = tiny_dino(tmp_path, cache, 'dino.warmup_teacher_temp_epochs=2')   # 8 warm-up steps
    distill.center.normal_(std=0.3)
    distill.step.fill_(step)
    x, d = views(2), cfg['dino']
    temp = {0: d['warmup_teacher_temp'], 5: (3 * d['warmup_teacher_temp'] + 5 * d['teacher_temp']) / 8,
            20: d['teacher_temp']}[step]                                   # the warm-up, by hand
    with torch.no_grad():
        t = ((distill.teacher(torch.cat(x[:2])) - distill.center) / temp).softmax(-1).chunk(2)   # centred, sharp
        s = [(distill.student(v) / d['student_temp']).log_softmax(-1) for v in x]
        expected = sum(-(t[i] * s[j]).sum(-1).mean() for i in range(2) for j in range(4) if i != j) / 6
        entropy = sum(torch.special.entr(ti).sum(-1).mean() for ti in t) / 2   # -sum p log p, 0 log 0 = 0
    torch.testing.assert_close(distill(x), expected)
    stats, log_k = distill.epoch_stats(), math.log(d['out_dim'])
    assert stats == pytest.approx({'teacher_entropy': entropy.item(), 'teacher_entropy_rel': entropy.item() / log_k,
                                   'loss_rel': expected.item() / log_k}, rel=1e-5)


def test_dino_schedules_are_those_of_the_official_recipe():
    warm = [dino.teacher_temp_at(s, 10, 0.04, 0.07) for s in (0, 5, 10, 11, 1000)]
    assert warm == pytest.approx([0.04, 0.055, 0.07, 0.07, 0.07])         # linear, then constant
    assert dino.teacher_temp_at(0, 0, 0.04, 0.07) == 0.07       # no warm-up
    m = [dino.momentum_at(s, 101, 0.99) for s in range(101)]
    assert m[0] == 0.99 and m[50] == pytest.approx(0.995) and m[100] == 1.0   # cosine from ema to exactly 1
    assert all(a < b for a, b in zip(m, m[1:]))


def test_dino_teacher_sees_only_the_global_crops_and_the_student_every_crop(tmp_path, cache):
    cfg, distill = tiny_dino(tmp_path, cache, 'dino.local_crops=3', 'dino.local_crop_size=16')
    seen = {'teacher': [], 'student': []}
    for who in seen:
        getattr(distill, who).backbone.patch_embed.register_forward_hook(
            lambda m, inputs, out, who=who: seen[who].append(tuple(inputs[0].shape)))
    torch.manual_seed(0)
    crops = dino.multi_crop(torch.randn(4, 1, 32, 32), cfg['data'], cfg['dino'], 32)
    assert [tuple(c.shape) for c in crops] == [(4, 1, 32, 32)] * 2 + [(4, 1, 16, 16)] * 3
    distill(crops)
    assert seen == {'teacher': [(8, 1, 32, 32)], 'student': [(8, 1, 32, 32), (12, 1, 16, 16)]}


def test_dino_augmentations_repeat_under_a_seed_keep_shapes_and_do_what_they_say():
    dcfg = config.load_config(config.REFERENCE_CONFIG)['data']
    d = config.load_config(config.REFERENCE_CONFIG)['dino']
    images = torch.randn(6, 1, 64, 64, generator=torch.Generator().manual_seed(0))

    def crops(seed):
        torch.manual_seed(seed)
        return dino.multi_crop(images, dcfg, d, 64)
    a, b, c = crops(1), crops(1), crops(2)
    assert len(a) == 2 + d['local_crops'] and all(x.shape == (6, 1, s, s) for x, s in zip(a, [64, 64] + [32] * 6))
    assert all(torch.equal(x, y) for x, y in zip(a, b)) and not any(torch.equal(x, y) for x, y in zip(a, c))
    # each part alone: solarisation inverts what is >= 0.5, jitter stays in [0, 1], blur keeps a flat image flat
    x01 = torch.rand(6, 1, 16, 16)
    aug = lambda **kw: data.grey_photometric((x01 - mean) / std, dcfg, sigma=(1.0, 1.0), **kw) * std + mean
    mean, std = dcfg['mean'][0], dcfg['std'][0]
    torch.testing.assert_close(aug(blur=0.0, solarize=0.0, jitter=0.0), x01)
    torch.testing.assert_close(aug(blur=0.0, solarize=1.0, jitter=0.0), torch.where(x01 >= 0.5, 1 - x01, x01))
    jittered = aug(blur=0.0, solarize=0.0, jitter=1.0)
    assert jittered.min() >= -1e-6 and jittered.max() <= 1 + 1e-6
    assert (jittered - x01).abs().amax((1, 2, 3)).min() > 0.01                   # every image changed
    flat = torch.full((2, 1, 16, 16), 0.3)
    torch.testing.assert_close(data.gaussian_blur(flat, torch.tensor([0.5, 2.0])), flat)
    impulse = torch.zeros(1, 1, 9, 9)
    impulse[..., 4, 4] = 1
    blurred = data.gaussian_blur(impulse, torch.tensor([1.0]))
    assert blurred.sum().item() == pytest.approx(1.0) and blurred[..., 4, 4] < 0.2 and blurred[..., 4, 5] > 0.05


def test_random_views_keep_black_black_and_differ():
    dcfg = config.load_config(config.REFERENCE_CONFIG)['data']
    black = torch.full((4, 1, 16, 16), -dcfg['mean'][0] / dcfg['std'][0])   # 0 before normalisation
    torch.testing.assert_close(data.random_views(black, dcfg, [0.2, 1.0]), black)
    torch.manual_seed(0)
    images = torch.randn(4, 1, 16, 16)
    a, b = data.random_views(images, dcfg, [0.4, 1.0]), data.random_views(images, dcfg, [0.4, 1.0])
    assert a.shape == images.shape and not torch.allclose(a, b)


def stage1_spy(monkeypatch):
    """Record the SelfDistillation model of a stage-1 run, its frozen tensors before training, and the head's last
    layer after every optimiser step."""
    seen = {'last_layer': []}
    train, update = engine.train, dino.SelfDistillation.update_teacher

    def spy(run, model, *a, **kw):
        seen['model'] = model
        seen['before'] = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
        return train(run, model, *a, **kw)

    def update_teacher(model):
        seen['last_layer'].append(model.student.head.last_layer.weight.detach().clone())
        update(model)
    monkeypatch.setattr(engine, 'train', spy)
    monkeypatch.setattr(dino.SelfDistillation, 'update_teacher', update_teacher)
    return seen


def test_dino_stage1_freezes_the_backbone_saves_the_teachers_targets_and_stage2_loads_them(tmp_path, cache,
                                                                                          monkeypatch):
    seen = stage1_spy(monkeypatch)
    cfg = tiny_config(tmp_path, cache)
    path = pretrain_targets.main(args(cfg, 'pretrain.pretext=dino', 'pretrain.epochs=1'))
    monkeypatch.undo()

    dino, before = seen['model'], seen['before']
    assert before and all(torch.equal(p, before[n]) for n, p in dino.named_parameters() if n in before)
    targets = dict(lora.target_parameters(dino.student.backbone))
    trainable = {n for n, p in dino.named_parameters() if p.requires_grad}
    head = {n for n, _ in dino.student.head.named_parameters('student.head')}
    assert trainable == {'student.backbone.' + n for n in targets} | head   # targets and the DINO head train
    saved = torch.load(path, weights_only=True)
    assert saved['targets'].keys() == targets.keys()                     # only the targets: no head
    teacher = dino.teacher.backbone
    assert all(torch.equal(saved['targets'][n], teacher.get_buffer(n)) for n in targets)   # the teacher's (default)
    assert not all(torch.equal(saved['targets'][n], p) for n, p in targets.items())        # not the student's
    meta = saved['meta']
    assert meta['pretext']['name'] == 'dino' and meta['pretext']['save'] == 'teacher' and meta['steps'] > 0
    assert not (path.parent / 'reconstructions.png').exists()           # MAE only
    assert not (path.parent / 'best.pth').exists()                      # epoch statistics, not validation scores
    history = torch.load(path.parent / 'checkpoint.pth', weights_only=False)['history']
    assert 0 < history[-1]['teacher_entropy_rel'] <= 1 and history[-1]['loss_rel'] > 0
    assert 'teacher_entropy_rel' in (path.parent / 'log.txt').read_text()

    run_dir = finetune.main(args(cfg, 'finetune.task=classification', 'finetune.epochs=1'))
    assert "'name': 'dino'" in (run_dir / 'log.txt').read_text()        # loaded, and the log says what they are
    metrics = json.loads((run_dir / 'metrics.json').read_text())
    assert metrics['init'] == 'tpp' and 0 < metrics['update_ratio']['median']
    survival = metrics['target_survival']
    assert survival['per_layer'].keys() == metrics['update_ratio']['per_layer'].keys() == {
        f'blocks.{i}.attn.qkv' for i in range(4)}
    assert -1 <= survival['cosine'] <= 1 and survival['norm_ratio'] > 0


def test_dino_save_student_saves_the_students_targets(tmp_path, cache, monkeypatch):
    seen = stage1_spy(monkeypatch)
    path = pretrain_targets.main(args(tiny_config(tmp_path, cache), 'pretrain.pretext=dino', 'pretrain.epochs=1',
                                      'dino.save=student'))
    saved, student = torch.load(path, weights_only=True), dict(lora.target_parameters(seen['model'].student.backbone))
    assert saved['meta']['pretext']['save'] == 'student'
    assert saved['targets'].keys() == student.keys() and all(torch.equal(saved['targets'][n], p)
                                                             for n, p in student.items())
    teacher = seen['model'].teacher.backbone
    assert not all(torch.equal(saved['targets'][n], teacher.get_buffer(n)) for n in student)


def test_dino_last_layer_gets_no_update_in_the_first_epoch_and_does_after(tmp_path, cache, monkeypatch):
    seen = stage1_spy(monkeypatch)
    pretrain_targets.main(args(tiny_config(tmp_path, cache), 'pretrain.pretext=dino', 'pretrain.epochs=2'))
    dino, weights = seen['model'], seen['last_layer']
    first = dino.frozen_steps                                          # one epoch's steps
    assert first > 0 and len(weights) == 2 * first
    start = weights[0]                                                 # after step 1: as initialised
    assert all(torch.equal(w, start) for w in weights[:first])
    assert not torch.equal(weights[first], start) and not torch.equal(dino.student.head.last_layer.weight, start)


def test_dino_config_errors_are_named(tmp_path, cache):
    cfg = tiny_config(tmp_path, cache)
    with pytest.raises(config.ConfigError, match='dino.save'):
        pretrain_targets.main(args(cfg, 'pretrain.pretext=dino', 'dino.save=both'))
    with pytest.raises(config.ConfigError, match='dino.local_crop_size'):
        pretrain_targets.main(args(cfg, 'pretrain.pretext=dino', 'dino.local_crop_size=12'))
    assert not (tmp_path / 'runs').exists()


def test_dino_stage1_resumes_exactly(tmp_path, cache, crash_after_checkpoint):
    cfg = tiny_config(tmp_path, cache)
    straight = pretrain_targets.main(args(cfg, 'pretrain.pretext=dino', 'pretrain.name=straight'))
    with crash_after_checkpoint():
        pretrain_targets.main(args(cfg, 'pretrain.pretext=dino', 'pretrain.name=crashed'))
    ckpt = torch.load(tmp_path / 'runs' / 'crashed' / 'checkpoint.pth', weights_only=False)
    assert any(k.startswith('teacher.') for k in ckpt['model']) and 'center' in ckpt['model']   # teacher resumes too
    assert ckpt['model']['step'] == ckpt['step'] > 0                    # and the schedules' step
    resumed = pretrain_targets.main(args(cfg, 'pretrain.pretext=dino', 'pretrain.name=crashed', resume=True))
    a, b = (torch.load(p, weights_only=True)['targets'] for p in (straight, resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ha, hb = (torch.load(p.parent / 'checkpoint.pth', weights_only=False)['history'] for p in (straight, resumed))
    assert ha == hb                                                    # losses and teacher entropies alike


def test_unknown_pretext_is_a_named_error(tmp_path, cache):
    with pytest.raises(config.ConfigError, match='pretrain.pretext'):
        pretrain_targets.main(args(tiny_config(tmp_path, cache), 'pretrain.pretext=simclr'))
