"""Both stages end to end on a tiny config: the backbone never changes in stage 1, the targets file holds only the
targets, stage 2 loads them and learns, and an interrupted run resumes exactly."""
import ast
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml

import checkpoints
import config
import data
import engine
import finetune
import lora
import metrics
import models
import predictions
import pretrain_backbone
import pretrain_targets
import runs
import synthetic
from conftest import args, tiny_config


def test_stage0_makes_the_backbone_once_and_loads_as_a_checkpoint(tmp_path, cache):
    cfg = tiny_config(tmp_path, cache)
    path = pretrain_backbone.main(args(cfg))
    stamp = path.stat().st_mtime_ns
    assert pretrain_backbone.main(args(cfg)) == path and path.stat().st_mtime_ns == stamp     # cached, not retrained
    ckpt = torch.load(path, weights_only=True)
    assert ckpt['recipe'] == pretrain_backbone.default_path(config.load_config(cfg))[1]
    mae = models.build_mae(config.load_config(cfg))
    assert checkpoints.load_checkpoint(mae, path).startswith(f'loaded {len(mae.state_dict())} tensors')   # all of them
    other = pretrain_backbone.default_path(config.load_config(cfg, ['backbone.bootstrap.epochs=2']))[0]
    assert other != path and not other.exists()                          # another recipe, another backbone


def test_stage1_freezes_backbone_and_saves_only_targets(tmp_path, cache, monkeypatch):
    seen = {}
    train_mae = engine.train_mae

    def spy(run, mae, dataset, ocfg, tag, frozen_after=None):   # snapshot the frozen backbone before training
        seen['mae'], seen['before'] = mae, {n: p.detach().clone() for n, p in mae.named_parameters()
                                            if not p.requires_grad}
        return train_mae(run, mae, dataset, ocfg, tag, frozen_after)
    monkeypatch.setattr(engine, 'train_mae', spy)
    path = pretrain_targets.main(args(tiny_config(tmp_path, cache)))

    mae, before = seen['mae'], seen['before']
    targets = {n for n, _ in lora.target_parameters(mae)}
    encoder = {n for n, _ in mae.named_parameters() if not models.is_decoder_key(n)}
    assert encoder - targets <= set(before)                               # every backbone tensor was frozen ...
    for n, p in mae.named_parameters():
        if n in before:
            assert torch.equal(p, before[n]), n                            # ... and is bit-identical after stage 1
    saved = torch.load(path, weights_only=True)
    assert set(saved['targets']) == targets                                # only target keys
    backbone_file = pretrain_backbone.resolve(config.load_config(tmp_path / 'tiny.yaml'))
    assert path.stat().st_size < 0.25 * backbone_file.stat().st_size
    assert saved['meta']['steps'] > 0 and saved['meta']['backbone'] == lora.backbone_fingerprint(mae)
    assert (path.parent / 'reconstructions.png').stat().st_size > 0


def test_decoder_warmup_trains_the_decoder_for_its_steps_then_freezes_it(tmp_path, cache, monkeypatch):
    seen = {}
    train_mae = engine.train_mae

    def spy(run, mae, dataset, ocfg, tag, frozen_after=None):
        seen['decoder'] = {id(p) for n, p in mae.named_parameters() if models.is_decoder_key(n) and p.requires_grad}
        seen['frozen_after'] = frozen_after
        return train_mae(run, mae, dataset, ocfg, tag, frozen_after)
    monkeypatch.setattr(engine, 'train_mae', spy)
    cfg = tiny_config(tmp_path, cache, pretrain={'decoder_warmup_steps': 1})
    path = pretrain_targets.main(args(cfg))
    n, params = seen['frozen_after']                     # engine.train freezes them (tests/test_engine.py)
    assert n == 1 and {id(p) for p in params} == seen['decoder'] and seen['decoder']
    assert torch.load(path, weights_only=True)['meta']['pretext']['decoder_warmup_steps'] == 1
    with pytest.raises(config.ConfigError, match='decoder_warmup_steps'):
        pretrain_targets.main(args(cfg, 'pretrain.train_decoder=false', 'pretrain.name=other'))


def test_linear_tpp_trains_the_head_on_the_frozen_pre_trained_targets(tmp_path, cache):
    cfg = tiny_config(tmp_path, cache, finetune={'epochs': 1})
    saved = torch.load(pretrain_targets.main(args(cfg)), weights_only=True)
    targets, source = saved['targets'], saved['meta']['data']           # fine-tuned on stage 1's data
    run_cfg = config.load_config(cfg, ['finetune.init=linear_tpp'])
    run = runs.Run(run_cfg, 'probe')
    model, counts, stage1 = finetune.build_model(run_cfg, run, pretrain_backbone.resolve(run_cfg), 3, 'linear_tpp',
                                                 source)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {f'head.{n}' for n, _ in
                                                                            model.head.named_parameters()}
    loaded = {n: p for n, p in lora.target_parameters(model.backbone)}
    assert set(loaded) == set(targets) and all(torch.equal(loaded[k], targets[k]) for k in targets)
    assert stage1.keys() == targets.keys()                             # kept for lora_diagnostics: no second read
    linear, linear_counts, none = finetune.build_model(run_cfg, run, pretrain_backbone.resolve(run_cfg), 3, 'linear',
                                                       source)
    assert counts['trainable'] == linear_counts['trainable'] and counts['targets'] > 0 == linear_counts['targets']
    assert none is None


@pytest.mark.parametrize('task', ['segmentation', 'classification'])
def test_full_finetuning_keeps_the_fixed_pos_embed(tmp_path, cache, task):
    cfg = config.load_config(tiny_config(tmp_path, cache), [f'finetune.task={task}'])
    model, _ = finetune.add_head(cfg, models.build_backbone(cfg), 3, 'full')
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    unused = {'backbone.norm.weight', 'backbone.norm.bias'} if task == 'segmentation' else set()
    assert frozen == {'backbone.pos_embed'} | unused          # the sin-cos table stays fixed, as in MAE fine-tuning


def test_lora_runs_record_their_update_ratio(tmp_path, cache):
    cfg = config.load_config(tiny_config(tmp_path, cache))
    backbone = models.build_backbone(cfg)
    lora.inject(backbone, cfg['peft'])
    model, _ = finetune.add_head(cfg, backbone, 2, 'random')
    diagnostics = finetune.lora_diagnostics(model, 'random')   # tpp adds target_survival (test_pretext.py)
    assert diagnostics.keys() == {'update_ratio'} and diagnostics['update_ratio']['median'] == 0   # B = 0
    assert finetune.lora_diagnostics(model, 'linear') == {}
    adapters = config.load_config(tiny_config(tmp_path, cache), ['peft.lora.r=0', 'peft.adapter.kind=parallel'])
    backbone = models.build_backbone(adapters)
    lora.inject(backbone, adapters['peft'])
    assert finetune.lora_diagnostics(finetune.add_head(adapters, backbone, 2, 'random')[0], 'random') == {}


def test_macro_f1_leaves_out_classes_absent_from_labels_and_predictions():
    labels = np.array([0, 0, 1, 1])
    probs = np.eye(4)[[0, 0, 1, 3]]                            # class 2: never true, never predicted; 3: predicted
    m = metrics.classification_metrics(probs, labels, 4)
    assert m['macro_f1'] == pytest.approx((1 + 2 / 3 + 0) / 3)  # classes 0, 1, 3


@pytest.mark.parametrize('task', ['segmentation', 'classification'])
def test_stage2_loads_targets_and_learns(tmp_path, cache, task):
    cfg = tiny_config(tmp_path, cache)
    pretrain_targets.main(args(cfg))
    run_dir = finetune.main(args(cfg, f'finetune.task={task}'))
    metrics = json.loads((run_dir / 'metrics.json').read_text())
    losses = [h['train_loss'] for h in metrics['history']]
    assert losses[-1] < losses[0], losses
    assert metrics['init'] == 'tpp' and 'targets: loaded' in (run_dir / 'log.txt').read_text()
    saved = torch.load(run_dir / 'model.pth', weights_only=False)
    assert saved['lora_merged'] and not any('.lora.' in k for k in saved['model'])
    # model.pth alone (a plain ViT + head, LoRA merged) reproduces the reported test score
    run_cfg = config.load_config(cfg, [f'finetune.task={task}'])
    model = models.TaskModel(models.build_backbone(run_cfg), models.build_head(run_cfg, saved['num_classes']))
    model.load_state_dict(saved['model'])
    run = runs.Run(run_cfg, 'reevaluate')
    dcfg = run_cfg['data']
    cases, info = data.prepare(dcfg, str(cache))
    dcfg['intensity'] = info['modes']                                      # as the stage resolved it
    test_cases = data.split_cases(cases, dcfg)['test']
    loader = engine.make_loader(run, data.SliceDataset(test_cases, dcfg, 32, 1, task, train=False), 32, train=False)
    again = predictions.evaluate(run, model, loader, task, saved['num_classes'], native=True)   # as the test split
    assert again['score'] == pytest.approx(metrics['test']['score'], abs=2e-3)


def test_stage2_saves_predicted_masks_on_the_source_grid(tmp_path, cache):
    cfg = tiny_config(tmp_path, cache, finetune={'epochs': 1, 'save_predictions': True})
    run_dir = finetune.main(args(cfg, 'finetune.init=linear'))
    saved = sorted((run_dir / 'predictions').glob('*_pred.nii.gz'))
    dcfg = config.load_config(cfg)['data']
    cases = data.split_cases(data.prepare(dcfg, str(cache))[0], dcfg)['test']
    test_ids = {c.id for c in cases}
    assert {p.name[:-len('_pred.nii.gz')] for p in saved} == test_ids
    case = next(c for c in cases if c.id == saved[0].name[:-len('_pred.nii.gz')])
    source, pred = nib.load(case.image), nib.load(saved[0])                  # the file's own grid, not RAS
    assert pred.shape == source.shape and np.allclose(pred.affine, source.affine)
    assert set(np.unique(np.asarray(pred.dataobj))) <= {0, 1, 2}
    assert (run_dir / 'predictions' / 'overlay.png').stat().st_size > 0


def test_stage2_refuses_targets_of_another_rank(tmp_path, cache):
    cfg = tiny_config(tmp_path, cache)
    pretrain_targets.main(args(cfg))
    with pytest.raises(lora.TargetMismatchError, match=r'peft'):
        finetune.main(args(cfg, 'peft.lora.r=4'))


@pytest.mark.parametrize('script, name', [(pretrain_targets, 'pretrain'), (finetune, 'finetune')])
def test_interrupted_run_resumes_exactly(tmp_path, cache, crash_after_checkpoint, script, name):
    cfg = tiny_config(tmp_path, cache, finetune={'epochs': 2, 'name': 'ft'})
    if script is finetune:
        pretrain_targets.main(args(cfg))
    straight = script.main(args(cfg, f'{name}.name=straight'))
    with crash_after_checkpoint():
        script.main(args(cfg, f'{name}.name=crashed'))
    saved = (tmp_path / 'runs' / 'crashed' / 'config.yaml').read_bytes()
    with pytest.raises(config.ConfigError, match=r'--resume: data.window differs'):     # nothing rewritten
        script.main(args(cfg, f'{name}.name=crashed', 'data.window=[-100, 200]', resume=True))
    assert (tmp_path / 'runs' / 'crashed' / 'config.yaml').read_bytes() == saved
    resumed = script.main(args(cfg, f'{name}.name=crashed', resume=True))
    result = resumed if script is pretrain_targets else resumed / 'metrics.json'
    stamp = result.stat().st_mtime_ns
    with pytest.raises(runs.RunFolderError, match='finished'):                              # its outputs are kept
        script.main(args(cfg, f'{name}.name=crashed', resume=True))
    assert result.stat().st_mtime_ns == stamp
    if script is pretrain_targets:
        a, b = (torch.load(p, weights_only=True)['targets'] for p in (straight, resumed))
    else:
        a, b = (torch.load(p / 'best.pth', weights_only=False)['model'] for p in (straight, resumed))
        ma, mb = (json.loads((p / 'metrics.json').read_text()) for p in (straight, resumed))
        assert ma['test'] == mb['test'] and ma['history'] == mb['history']
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_prompt_tuning_alone_through_both_stages(tmp_path, cache):
    cfg = tiny_config(tmp_path, cache, finetune={'epochs': 1})
    vpt = ['peft.prompt.tokens=8', 'peft.lora.r=0']
    path = pretrain_targets.main(args(cfg, *vpt))
    saved = torch.load(path, weights_only=True)
    assert set(saved['targets']) == {'prompt.tokens'} and saved['targets']['prompt.tokens'].shape == (1, 8, 32)
    assert saved['meta']['peft'] == {'prompt': None}                            # the prompts, nothing else
    run_dir = finetune.main(args(cfg, *vpt))
    assert 'targets: loaded' in (run_dir / 'log.txt').read_text()
    model = torch.load(run_dir / 'model.pth', weights_only=False)['model']
    assert not model['backbone.prompt.tokens'].equal(saved['targets']['prompt.tokens'])   # fine-tuned from there
    with pytest.raises(lora.TargetMismatchError, match=r'peft'):
        finetune.main(args(cfg, *vpt, 'peft.prompt.deep=true', 'finetune.name=deep'))


def test_medmnist_file_through_both_stages_at_the_default_intensity(tmp_path, cache):
    rng = np.random.default_rng(0)
    npz = {}
    for split, n in (('train', 64), ('val', 8), ('test', 8)):
        labels = np.arange(n) % 2
        images = rng.integers(20, 80, (n, 28, 28), dtype=np.uint8)
        images[labels == 1, 8:20, 8:20] = 220                                    # class 1: a bright square
        npz.update({f'{split}_images': images, f'{split}_labels': labels[:, None].astype(np.uint8)})
    np.savez(tmp_path / 'breastmnist.npz', **npz)
    cfg = tiny_config(tmp_path, cache, finetune={'epochs': 1})
    medmnist = ['data.layout=medmnist', f'data.root={tmp_path / "breastmnist.npz"}']   # data.intensity: auto
    targets = pretrain_targets.main(args(cfg, *medmnist))
    run_dir = finetune.main(args(cfg, *medmnist, 'finetune.task=classification', 'data.label_fraction=0.5'))
    log = (run_dir / 'log.txt').read_text()
    assert 'classification: 32 labelled training cases (32 slices, label_fraction 0.5), 8 val, 8 test' in log
    for folder in (targets.parent, run_dir):                                    # (above: the file's own splits)
        assert 'data.intensity auto -> none (MedMNIST arrays)\n' in (folder / 'log.txt').read_text()
        assert yaml.safe_load((folder / 'config.yaml').read_text())['data']['intensity'] == 'none'   # as used
    metrics = json.loads((run_dir / 'metrics.json').read_text())
    assert metrics['test']['majority_floor'] == 0.5 and 0 <= metrics['test']['auc'] <= 1


def test_everything_checkable_is_checked_before_stage0_and_the_run_folder(tmp_path, cache, monkeypatch):
    cfg = tiny_config(tmp_path, cache)
    with monkeypatch.context() as m:
        m.setattr(pretrain_targets, 'resolve', lambda cfg: pytest.fail('stage 0 ran before the checks'))
        m.setattr(pretrain_backbone, 'resolve', lambda cfg: pytest.fail('stage 0 ran before the checks'))
        for main in (pretrain_targets.main, finetune.main):
            with pytest.raises(data.DataError, match='imagesTr: folder not found'):
                main(args(cfg, 'data.layout=msd', f'data.root={tmp_path}'))
            with pytest.raises(config.ConfigError, match=r'4 blocks: model.depth is 3'):   # stage 2's segmentation head
                main(args(cfg, 'model.depth=3'))
            with pytest.raises(config.ConfigError, match=r"peft.lora.layers: 'qkvv' matches no linear layer"):
                main(args(cfg, 'peft.lora.layers=[qkvv]'))
        with pytest.raises(config.ConfigError, match='finetune.targets: .*none.pth does not exist'):
            finetune.main(args(cfg, f'finetune.targets={tmp_path}/none.pth'))
    mae = models.build_mae(config.load_config(cfg))
    checkpoints.load_checkpoint(mae, pretrain_backbone.resolve(config.load_config(cfg)))
    encoder = {k: v for k, v in mae.state_dict().items() if not models.is_decoder_key(k)}
    torch.save({'model': encoder}, tmp_path / 'encoder.pth')
    with pytest.raises(checkpoints.CheckpointError, match='train_decoder'):
        pretrain_targets.main(args(cfg, 'pretrain.train_decoder=false', f'backbone.checkpoint={tmp_path}/encoder.pth'))
    assert not (tmp_path / 'runs').exists()


def test_a_run_stopped_before_its_first_checkpoint_runs_again(tmp_path, cache, monkeypatch):
    cfg = tiny_config(tmp_path, cache, pretrain={'epochs': 1})
    with monkeypatch.context() as m:
        m.setattr(engine, 'to_device', lambda batch, device: (_ for _ in ()).throw(KeyboardInterrupt('killed')))
        with pytest.raises(KeyboardInterrupt):
            pretrain_targets.main(args(cfg))
    assert (tmp_path / 'runs' / 'pretrain' / 'log.txt').is_file()
    assert not (tmp_path / 'runs' / 'pretrain' / 'checkpoint.pth').exists()
    assert pretrain_targets.main(args(cfg)).is_file()                    # no --resume, no deleting by hand


def test_the_first_studys_backbone_is_still_shipped_under_its_recipe():
    """results/study ran on the textures-only backbone (weights/README.md): its recipe still names the shipped file,
    so that study is reproduced without training it again."""
    cfg = config.load_config(config.REFERENCE_CONFIG, ['backbone.bootstrap.images=10000', 'backbone.bootstrap.epochs=30',
                                                       'backbone.bootstrap.medical=0'])
    path, recipe = pretrain_backbone.default_path(cfg)
    assert path == pretrain_backbone.WEIGHTS / 'backbone-7434eacbb9.pth'
    assert torch.load(path, weights_only=True)['recipe'] == recipe


def test_the_shipped_backbone_is_the_default_configs_and_has_learned_to_reconstruct():
    """weights/ holds the default config's stage 0 (weights/README.md): the Quickstart never trains it. Its recipe
    is the default config's, every tensor loads, and on fresh upstream images it reconstructs masked patches better
    than their best constant guess (each patch's mean: 0 in normalised pixels), which an untrained MAE does not."""
    cfg = config.load_config(config.REFERENCE_CONFIG)
    path, recipe = pretrain_backbone.default_path(cfg)
    assert path.parent == pretrain_backbone.WEIGHTS and path.is_file()
    assert torch.load(path, weights_only=True)['recipe'] == recipe
    torch.manual_seed(0)
    untrained, mae = models.build_mae(cfg), models.build_mae(cfg)
    assert checkpoints.load_checkpoint(mae, path).startswith(f'loaded {len(mae.state_dict())} tensors')
    boot = cfg['backbone']['bootstrap']                    # fresh upstream images (another seed: none of the training set's)
    images = np.stack(synthetic.upstream_images(64, cfg['model']['img_size'], 123, boot['medical'])) / 255.0
    x = (torch.tensor(images, dtype=torch.float32)[:, None] - cfg['data']['mean'][0]) / cfg['data']['std'][0]
    with torch.no_grad():
        losses = {}
        for name, model in (('trained', mae), ('untrained', untrained)):
            torch.manual_seed(1)                           # the same masks for both
            losses[name], pred, mask = model(x, 0.75)
        mean_guess = mae.forward_loss(x, torch.zeros_like(pred), mask)
    assert losses['trained'] < 0.95 * mean_guess < 0.95 * losses['untrained'], (losses, mean_guess)


def test_stage_scripts_take_from_each_other_only_stage0s_resolve():
    """What stage 1 and stage 2 share (checkpoint loading, MAE training, run plumbing) lives in shared modules; the
    one crossing is pretrain_backbone.resolve, which runs stage 0 when no backbone exists."""
    stages = ('pretrain_backbone', 'pretrain_targets', 'finetune')
    for script in ('pretrain_targets.py', 'finetune.py'):
        tree = ast.parse((Path(__file__).parents[1] / script).read_text())
        taken = {(n.module, a.name) for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names}
        taken |= {(n.value.id, n.attr) for n in ast.walk(tree)
                  if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name)}
        assert {(module, name) for module, name in taken if module in stages} == {('pretrain_backbone', 'resolve')}


def test_the_shipped_backbone_reconstructs_every_upstream_kind_better_than_the_patch_mean():
    """tools/backbone_loss.py (weights/README.md's table): on new patients of each modality and on textures the
    default backbone beats each patch's mean, and an untrained MAE does not."""
    from tools import backbone_loss
    path = pretrain_backbone.default_path(config.load_config(config.REFERENCE_CONFIG))[0]
    for kind, (trained, guess, untrained) in backbone_loss.losses([path]).items():
        assert trained < 0.9 * guess < 0.9 * untrained, kind
