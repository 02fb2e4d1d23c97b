"""The config: the reference config.yaml and config.SCHEMA list the same keys, every value is checked against its
type and range and the rules between keys, and a user error reaches the user as one `error: ...` line, exit 2,
before anything is written."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import config
import finetune
import models
import pretrain_backbone
import pretrain_targets
import runs
from conftest import args, tiny_config

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path, cfg, name='cfg.yaml'):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg))
    return path


def leaves(section, prefix=''):
    for key, value in section.items():
        yield from leaves(value, f'{prefix}{key}.') if isinstance(value, dict) else [prefix + key]


def test_schema_and_config_yaml_list_the_same_keys():
    assert sorted(leaves(config.read_yaml(config.REFERENCE_CONFIG))) == sorted(config.SCHEMA)
    assert config.SCHEMA['model.preset'].choices == tuple(models.PRESETS)


def test_partial_user_config_gets_reference_defaults(tmp_path):
    cfg = config.load_config(write(tmp_path, {'pretrain': {'epochs': 3}}))
    reference = config.load_config(config.REFERENCE_CONFIG)
    assert cfg['pretrain']['epochs'] == 3
    assert cfg['finetune'] == reference['finetune']


@pytest.mark.parametrize('bad, message', [
    ({'pretrain': {'lrr': 1.0}}, r"unknown key 'pretrain.lrr'"),
    ({'optim': {'lr': 1.0}}, r"unknown key 'optim'"),
    ({'model': 3}, r"'model' must be a mapping"),
    ({'pretrain': {'epochs': 'ten'}}, r"pretrain.epochs must be an integer > 0, got 'ten'"),
    ({'pretrain': {'lr': 'fast'}}, r"pretrain.lr must be a number > 0, got 'fast'"),
    ({'pretrain': {'train_decoder': 1}}, r'pretrain.train_decoder must be true or false, got 1'),
])
def test_bad_config_names_file_and_key(tmp_path, bad, message):
    path = write(tmp_path, bad)
    with pytest.raises(config.ConfigError, match=message) as err:
        config.load_config(path)
    assert str(err.value).startswith(f'{path}: ')


# Every value the issue found accepted (silently wrong training, late errors), and the classes around them.
BAD_VALUES = [
    'pretrain.clip_grad=-1', 'finetune.clip_grad=0', 'backbone.bootstrap.clip_grad=-1',
    'pretrain.mask_ratio=1.0', 'pretrain.mask_ratio=1.5', 'backbone.bootstrap.mask_ratio=-0.1',
    'peft.lora.alpha=0', 'peft.lora.r=-1', 'peft.lora.dropout=1', 'peft.lora.layers=[]', 'peft.lora.layers=[""]',
    'peft.lora.layers=qkv', 'peft.adapter.kind=lora', 'peft.adapter.dim=0', 'peft.adapter.scale=0',
    'peft.prompt.tokens=-1', 'peft.prompt.deep=yes please',
    'dino.ema=2', 'dino.out_dim=0', 'dino.local_crops=-1', 'dino.save=both', 'dino.teacher_temp=0', 'dino.center_momentum=1.5',
    'dino.global_crops_scale=[0, 1]', 'dino.local_crops_scale=[0.9, 0.4]',
    'data.augment.crop_scale=[1.0, 0.5]', 'data.augment.crop_scale=[0.5, 1.5]', 'data.augment.crop_scale=[0.5]',
    'data.augment.hflip=1.5', 'data.augment.vflip=-0.1', 'data.augment.rotate=-10', 'data.augment.rotate=270',
    'finetune.name=123', 'finetune.name=""', 'model.embed_dim=abc', 'model.depth=0', 'model.mlp_ratio=-1',
    'data.num_classes=two', 'data.num_classes=1', 'finetune.seg_channels=[]', 'finetune.seg_channels=[16, 0]',
    'run.seed=-1', 'run.seed=1.5', 'backbone.bootstrap.seed=-1', 'run.log_every=0', 'run.workers=-1',
    'run.device=gpu', 'run.device=cuda:x', 'run.amp=fp32', 'run.out_dir=null', 'run.cache_dir=[a]',
    'model.preset=vit_giant', 'pretrain.pretext=simclr', 'finetune.init=lora', 'finetune.task=detection',
    'finetune.pool=max', 'data.layout=nifti', 'data.intensity=ct', 'data.intensity=[auto]', 'data.axis=3',
    'data.axis=true',
    'data.window=[240, -160]', 'data.window=[40, 40]', 'data.window=[40]', 'data.window=abc',
    'data.window=[0, .nan]', 'data.percentile=[99.5, 0.5]', 'data.percentile=[-1, 50]', 'data.percentile=[1, 101]',
    'data.mean=[]', 'data.mean=0.5', 'data.std=[0.0]', 'data.std=[-1]', 'data.mask_suffix=""',
    'data.val_fraction=0', 'data.test_fraction=1', 'data.label_fraction=0', 'data.label_fraction=1.5',
    'data.skip_empty=2', 'data.cache_mb=-1',
    'pretrain.epochs=0', 'pretrain.epochs=-1', 'finetune.epochs=null', 'finetune.batch_size=0',
    'backbone.bootstrap.batch_size=null', 'pretrain.lr=null', 'finetune.lr=.nan', 'pretrain.lr=inf',
    'finetune.lr=0', 'pretrain.weight_decay=-0.1', 'pretrain.warmup_epochs=-1', 'pretrain.grid_images=0',
    'pretrain.train_decoder=1', 'pretrain.decoder_warmup_steps=-1', 'finetune.merge_lora=null',
]


@pytest.mark.parametrize('override', BAD_VALUES)
def test_bad_values_are_refused_naming_the_key_and_the_allowed_range(override):
    key, _, value = override.partition('=')
    with pytest.raises(config.ConfigError) as err:
        config.load_config(config.REFERENCE_CONFIG, [override])
    allowed = str(config.SCHEMA[key])
    assert str(err.value) == f'--set {override}: {key} must be {allowed}, got {yaml.safe_load(value)!r}'


def test_messages_say_the_range_in_words():
    assert str(config.SCHEMA['pretrain.clip_grad']) == 'null or a number > 0'
    assert str(config.SCHEMA['pretrain.mask_ratio']) == 'a number in [0, 1)'
    assert str(config.SCHEMA['run.seed']) == 'an integer in [0, 4294967295]'
    assert str(config.SCHEMA['data.percentile']) == '[low, high] with low < high, each a number in [0, 100]'
    assert str(config.SCHEMA['finetune.task']) == 'one of segmentation, classification'


def test_yaml_quirks_and_null_defaults_are_read_as_meant():
    cfg = config.load_config(config.REFERENCE_CONFIG, [
        'pretrain.lr=1e-3', 'finetune.lr=1', 'peft.lora.layers=[qkv, fc1]', 'backbone.checkpoint=/x/mae.pth',
        'finetune.init=random', 'model.embed_dim=64', 'model.depth=null', 'data.std=[1e-1]', 'data.window=[-100, 300]',
        'finetune.clip_grad=null', 'data.num_classes=3', 'data.intensity=[window, percentile]'])
    assert cfg['data']['intensity'] == ['window', 'percentile']   # one mode per input channel
    assert cfg['pretrain']['lr'] == 1e-3                      # YAML reads 1e-3 as a string; float keys accept it
    assert cfg['finetune']['lr'] == 1.0 and isinstance(cfg['finetune']['lr'], float)   # an int for a float key
    assert cfg['data']['std'] == [0.1] and cfg['data']['window'] == [-100.0, 300.0]
    assert cfg['peft']['lora']['layers'] == ['qkv', 'fc1'] and cfg['backbone']['checkpoint'] == '/x/mae.pth'
    assert cfg['model']['embed_dim'] == 64 and cfg['model']['depth'] is None and cfg['finetune']['clip_grad'] is None
    with pytest.raises(config.ConfigError, match=r"--set pretrain.lrr=1: unknown key 'pretrain.lrr'"):
        config.load_config(config.REFERENCE_CONFIG, ['pretrain.lrr=1'])
    with pytest.raises(config.ConfigError, match='expected KEY=VALUE'):
        config.load_config(config.REFERENCE_CONFIG, ['pretrain.lr'])


@pytest.mark.parametrize('overrides, stage, message', [
    (['data.val_fraction=0.5', 'data.test_fraction=0.5'], None, r'data.val_fraction \+ data.test_fraction must be < 1'),
    (['data.layout=msd'], None, 'data.root must be set for data.layout msd'),
    (['model.in_chans=1', 'data.mean=[0.5, 0.5]'], None, r'data.mean must have 1 or model.in_chans = 1 values, got \[0.5, 0.5\]'),
    (['model.in_chans=3', 'data.std=[1, 1]'], None, 'data.std must have 1 or model.in_chans = 3 values'),
    (['mae.decoder_embed_dim=130'], None, 'mae.decoder_embed_dim must be a multiple of 4'),
    (['mae.decoder_num_heads=3', 'mae.decoder_embed_dim=128'], None, 'and of mae.decoder_num_heads = 3'),
    (['pretrain.decoder_warmup_steps=5', 'pretrain.pretext=dino'], None, 'pretrain.decoder_warmup_steps must be 0'),
    (['pretrain.decoder_warmup_steps=5', 'pretrain.train_decoder=false'], None, 'decoder_warmup_steps must be 0'),
    (['peft.lora.r=0'], 1, 'peft: no target parameters'),
    (['peft.lora.r=0', 'finetune.init=full'], 1, 'peft: no target parameters'),     # stage 1 trains them anyway
    (['peft.lora.r=0'], 2, 'peft: no target parameters'),
    (['peft.lora.r=0', 'finetune.init=random'], None, 'peft: no target parameters'),
])
def test_rules_between_keys(overrides, stage, message):
    with pytest.raises(config.ConfigError, match=message) as err:
        config.load_config(config.REFERENCE_CONFIG, overrides, stage=stage)
    assert str(err.value).startswith(f'{config.REFERENCE_CONFIG} with --set: ')


@pytest.mark.parametrize('overrides, stage', [
    (['peft.lora.r=0', 'finetune.init=full'], 2), (['peft.lora.r=0', 'finetune.init=linear'], None),
    (['peft.lora.r=0'], 0), (['peft.lora.r=0', 'peft.adapter.kind=parallel'], 1),
    (['peft.lora.r=0', 'peft.prompt.tokens=4'], 2), (['model.in_chans=null', 'data.mean=[0.1, 0.2, 0.3]'], None),
    (['model.in_chans=3', 'data.mean=[0.1, 0.2, 0.3]'], None), (['data.layout=msd', 'data.root=/data/Task09'], None),
    (['pretrain.decoder_warmup_steps=5'], 1), (['pretrain.pretext=dino', 'mae.decoder_embed_dim=12',
                                                 'mae.decoder_num_heads=3'], 1),
])
def test_rules_between_keys_allow_what_is_consistent(overrides, stage):
    config.load_config(config.REFERENCE_CONFIG, overrides, stage=stage)


def test_model_shape_rules_are_config_errors_naming_the_keys():
    tiny = {'preset': None, 'img_size': 32, 'patch_size': 8, 'in_chans': 1, 'embed_dim': 32, 'depth': 4,
            'num_heads': 2, 'mlp_ratio': 2.0}
    for change, message in [({'img_size': 30}, 'model.img_size 30 is not a multiple of model.patch_size 8'),
                            ({'num_heads': 3}, 'model.embed_dim 32 must be a multiple of 4 .* model.num_heads 3'),
                            ({'embed_dim': 18, 'num_heads': 1}, 'model.embed_dim 18 must be a multiple of 4'),
                            ({'depth': None}, 'model.preset is null: give every size, missing model.depth')]:
        with pytest.raises(config.ConfigError, match=message):
            models.vit_kwargs({**tiny, **change})


def test_missing_config_file_is_named(tmp_path):
    with pytest.raises(config.ConfigError, match='nope.yaml does not exist'):
        config.load_config(tmp_path / 'nope.yaml')


def test_config_yaml_syntax_errors_name_the_file_or_override(tmp_path):
    path = tmp_path / 'bad.yaml'
    path.write_text('pretrain:\n  lr: [1e-3\n')
    with pytest.raises(config.ConfigError, match=rf'{path}: not valid YAML'):
        config.load_config(path)
    with pytest.raises(config.ConfigError, match=r'--set peft.lora.layers=\[qkv: not valid YAML'):
        config.load_config(config.REFERENCE_CONFIG, ['peft.lora.layers=[qkv'])


# ---------------------------------------------------------------------------------------------------- the user's view

def files_under(*folders):
    return [p for f in folders if f.exists() for p in f.rglob('*')]


@pytest.mark.parametrize('override, key', [('pretrain.clip_grad=-1', 'pretrain.clip_grad'),   # a config value
                                           ('data.layout=msd', 'missing/imagesTr')])         # data: no such folder
def test_a_user_error_is_one_line_exit_2_and_nothing_written(tmp_path, override, key):
    cache = tmp_path / 'cache'                                            # a fresh cache: nothing may appear in it
    command = [sys.executable, 'finetune.py', '--config', str(tiny_config(tmp_path, cache)), '--set', override,
               '--set', f'data.root={tmp_path}/missing']
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=env)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith('error: ') and done.stderr.count('\n') == 1 and key in done.stderr
    assert 'Traceback' not in done.stderr + done.stdout
    assert not files_under(tmp_path / 'runs', cache)
    debug = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env={**env, 'TPP_DEBUG': '1'})
    assert debug.returncode == 1 and 'Traceback' in debug.stderr and key in debug.stderr


def unwritable(tmp_path):
    """A folder this process cannot make: under a read-only folder, or (as root, whom chmod does not stop) a file."""
    locked = tmp_path / 'locked'
    locked.mkdir()
    locked.chmod(0o555)
    if not os.access(locked, os.W_OK):
        yield locked / 'runs'
    (tmp_path / 'afile').write_text('')
    yield tmp_path / 'afile' / 'runs'


@pytest.mark.parametrize('key', ['run.out_dir', 'run.cache_dir'])
def test_unwritable_folders_are_refused_before_stage0(tmp_path, cache, monkeypatch, key):
    monkeypatch.setattr(pretrain_targets, 'resolve', lambda cfg: pytest.fail('stage 0 ran before the checks'))
    monkeypatch.setattr(pretrain_backbone, 'resolve', lambda cfg: pytest.fail('stage 0 ran before the checks'))
    cfg = tiny_config(tmp_path, cache)
    for folder in unwritable(tmp_path):
        for main in (pretrain_backbone.main, pretrain_targets.main, finetune.main):
            with pytest.raises(config.ConfigError, match=rf'{key}: {folder} cannot be'):
                main(args(cfg, f'{key}={folder}'))
        assert not folder.exists()


def test_check_writable_accepts_folders_to_be_made(tmp_path):
    runs.check_writable(tmp_path / 'a' / 'b', 'run.out_dir')
    runs.check_writable(tmp_path, 'run.out_dir')
    assert not (tmp_path / 'a').exists()
