"""The DINO pretext (pretrain.pretext: dino): the teacher is an EMA of the student's targets and head only, the centre
is an EMA of the teacher's batch mean, the backbone never changes, and only the targets are saved for stage 2."""
import json

import pytest
import torch

import config
import data
import engine
import finetune
import lora
import models
import pretrain_targets
from conftest import args, tiny_config


def tiny_dino(tmp_path, cache):
    """The tiny config's stage-1 DINO model, targets inserted, backbone random (no checkpoint needed here)."""
    cfg = config.load_config(tiny_config(tmp_path, cache), ['pretrain.pretext=dino'])
    torch.manual_seed(0)
    student = models.build_dino(cfg)
    pretrain_targets.insert_targets(student, cfg)
    d = cfg['dino']
    return cfg, pretrain_targets.SelfDistillation(student, d['teacher_temp'], d['student_temp'], d['center_momentum'],
                                                  d['ema'])


def views(n=2, batch=4):
    """n random 'views' (random images suffice: the loss only needs n batches of the same size)."""
    torch.manual_seed(1)
    return [torch.randn(batch, 1, 32, 32) for _ in range(n)]


def test_dino_teacher_is_an_ema_of_the_students_targets_and_head_only(tmp_path, cache):
    cfg, dino = tiny_dino(tmp_path, cache)
    student, teacher = dino.student, dino.teacher
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
    dino(views()).backward()
    assert all((p.grad is not None) == p.requires_grad for p in dino.parameters())
    optimizer.step()
    dino.update_teacher()

    m, params = cfg['dino']['ema'], dict(student.named_parameters())
    for n, b in teacher.named_buffers():
        assert not torch.equal(params[n], before[n]), n                   # the student moved ...
        torch.testing.assert_close(b, m * before[n] + (1 - m) * params[n].detach(), rtol=1e-6, atol=1e-7)  # float32 eps
    assert all(torch.equal(p, backbone[n]) for n, p in frozen.items())   # the backbone is bit-identical


def test_dino_centre_is_an_ema_of_the_teachers_batch_mean(tmp_path, cache):
    cfg, dino = tiny_dino(tmp_path, cache)
    dino.center.normal_()
    center, x = dino.center.clone(), views(3)
    with torch.no_grad():
        batch_mean = dino.teacher(torch.cat(x)).mean(dim=0)   # (K,) over every view of every image
    dino(x)
    m = cfg['dino']['center_momentum']
    torch.testing.assert_close(dino.center, m * center + (1 - m) * batch_mean, rtol=0, atol=1e-6)


def test_dino_loss_is_the_cross_entropy_of_each_teacher_view_with_every_other_student_view(tmp_path, cache):
    cfg, dino = tiny_dino(tmp_path, cache)
    dino.center.normal_()
    x, d = views(3), cfg['dino']
    with torch.no_grad():
        t = ((dino.teacher(torch.cat(x)) - dino.center) / d['teacher_temp']).softmax(-1).chunk(3)   # centred, sharp
        s = (dino.student(torch.cat(x)) / d['student_temp']).log_softmax(-1).chunk(3)
        expected = sum(-(t[i] * s[j]).sum(-1).mean() for i in range(3) for j in range(3) if i != j) / 6
    torch.testing.assert_close(dino(x), expected)


def test_random_views_keep_black_black_and_differ():
    dcfg = config.load_config(config.REFERENCE_CONFIG)['data']
    black = torch.full((4, 1, 16, 16), -dcfg['mean'][0] / dcfg['std'][0])   # 0 before normalisation
    torch.testing.assert_close(data.random_views(black, dcfg, [0.2, 1.0]), black)
    torch.manual_seed(0)
    images = torch.randn(4, 1, 16, 16)
    a, b = data.random_views(images, dcfg, [0.4, 1.0]), data.random_views(images, dcfg, [0.4, 1.0])
    assert a.shape == images.shape and not torch.allclose(a, b)


def test_dino_stage1_freezes_the_backbone_saves_only_targets_and_stage2_loads_them(tmp_path, cache, monkeypatch):
    seen = {}
    train = engine.train

    def spy(run, model, *a, **kw):   # snapshot every frozen tensor before stage-1 training
        seen['model'] = model
        seen['before'] = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
        return train(run, model, *a, **kw)
    monkeypatch.setattr(engine, 'train', spy)
    cfg = tiny_config(tmp_path, cache)
    path = pretrain_targets.main(args(cfg, 'pretrain.pretext=dino', 'pretrain.epochs=1'))
    monkeypatch.setattr(engine, 'train', train)

    student, before = seen['model'].student, seen['before']
    assert before and all(torch.equal(p, before[n]) for n, p in seen['model'].named_parameters() if n in before)
    targets = dict(lora.target_parameters(student.backbone))
    trainable = {n for n, p in seen['model'].named_parameters() if p.requires_grad}
    head = {n for n, _ in student.head.named_parameters('student.head')}
    assert trainable == {'student.backbone.' + n for n in targets} | head   # targets and the DINO head train
    saved = torch.load(path, weights_only=True)
    assert saved['targets'].keys() == targets.keys()                     # only the targets: no head, no teacher
    assert all(torch.equal(saved['targets'][n], p) for n, p in targets.items())
    assert saved['meta']['pretext']['name'] == 'dino' and saved['meta']['steps'] > 0
    assert not (path.parent / 'reconstructions.png').exists()           # MAE only

    run_dir = finetune.main(args(cfg, 'finetune.task=classification', 'finetune.epochs=1'))
    assert "'name': 'dino'" in (run_dir / 'log.txt').read_text()        # loaded, and the log says what they are
    assert json.loads((run_dir / 'metrics.json').read_text())['init'] == 'tpp'


def test_dino_stage1_resumes_exactly(tmp_path, cache, crash_after_checkpoint):
    cfg = tiny_config(tmp_path, cache)
    straight = pretrain_targets.main(args(cfg, 'pretrain.pretext=dino', 'pretrain.name=straight'))
    with crash_after_checkpoint():
        pretrain_targets.main(args(cfg, 'pretrain.pretext=dino', 'pretrain.name=crashed'))
    ckpt = torch.load(tmp_path / 'runs' / 'crashed' / 'checkpoint.pth', weights_only=False)
    assert any(k.startswith('teacher.') for k in ckpt['model']) and 'center' in ckpt['model']   # teacher resumes too
    resumed = pretrain_targets.main(args(cfg, 'pretrain.pretext=dino', 'pretrain.name=crashed', resume=True))
    a, b = (torch.load(p, weights_only=True)['targets'] for p in (straight, resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_unknown_pretext_is_a_named_error(tmp_path, cache):
    with pytest.raises(config.ConfigError, match='pretrain.pretext'):
        pretrain_targets.main(args(tiny_config(tmp_path, cache), 'pretrain.pretext=simclr'))
