"""The config, its schema, and the errors a user can fix.

`load_config` reads the reference config.yaml (it documents, and gives a default for, every key), then the user's
file, then each --set KEY=VALUE, and checks every value against SCHEMA (its type and range) and the rules between
keys before anything else runs. Every error a user causes (a config value, a data file, a checkpoint, a run folder)
is a `UserError`: the entry points print its message as one `error: ...` line and exit with status 2 (runs.cli);
any other exception is a bug and keeps its traceback.
"""
import copy
import math
import re
from pathlib import Path

import yaml


class UserError(Exception):
    """A problem the user can fix. The message says what is wrong, where (key, file or case) and what to do."""


class ConfigError(UserError, ValueError):
    pass


REFERENCE_CONFIG = Path(__file__).with_name('config.yaml')   # documents, and gives a default for, every key


# ----------------------------------------------------------------------------------------------------------------------
# Value types: each checks one value (converting it where YAML reads it another way) and says what it allows

class _Refused(Exception):
    pass


class _Type:
    """check(value) -> the value as the config holds it, or _Refused; str() says what is allowed. null=True also
    allows null (None). true/false are only ever a Bool's (YAML's true is not the integer 1)."""

    def __init__(self, null=False):
        self.null = null

    def check(self, value):
        if value is None and self.null:
            return None
        if value is None or isinstance(value, bool) != isinstance(self, Bool):
            raise _Refused
        return self.convert(value)

    def __str__(self):
        return ('null or ' if self.null else '') + self.what()


class Int(_Type):
    """An integer in an interval written as in mathematics: '[0, inf)', '(0, inf)', '[2, 8]'."""
    noun = 'an integer'

    def __init__(self, interval, null=False):
        super().__init__(null)
        lo, hi = interval[1:-1].split(',')
        self.interval, self.lo, self.hi = interval, float(lo), float(hi)
        self.lo_open, self.hi_open = interval[0] == '(', interval[-1] == ')'

    def convert(self, value):
        if not isinstance(value, int):
            raise _Refused
        return self.in_range(value)

    def in_range(self, value):
        above = value > self.lo if self.lo_open else value >= self.lo
        below = value < self.hi if self.hi_open else value <= self.hi
        if not (math.isfinite(value) and above and below):
            raise _Refused
        return value

    def what(self):
        if self.hi == math.inf == -self.lo:
            return 'a finite number'
        if self.hi == math.inf:
            return f"{self.noun} {'>' if self.lo_open else '>='} {self.lo:g}"
        return f'{self.noun} in {self.interval}'


class Float(Int):
    """A finite number in an interval; ints and strings such as '1e-3' (YAML reads 1e-3 as a string) become floats."""
    noun = 'a number'

    def convert(self, value):
        try:
            return self.in_range(float(value))
        except (TypeError, ValueError):
            raise _Refused from None


class Bool(_Type):
    def convert(self, value):
        return value

    def what(self):
        return 'true or false'


class Str(_Type):
    def convert(self, value):
        if not isinstance(value, str) or not value:
            raise _Refused
        return value

    def what(self):
        return 'a non-empty string'


class Choice(_Type):
    def __init__(self, *choices, null=False):
        super().__init__(null)
        self.choices = choices

    def convert(self, value):
        if not any(type(value) is type(c) and value == c for c in self.choices):   # 1.0 is not the choice 1
            raise _Refused
        return value

    def what(self):
        return 'one of ' + ', '.join(map(str, self.choices))


class Pattern(_Type):
    """A string matching a regular expression; `shown` says it in words."""

    def __init__(self, regex, shown, null=False):
        super().__init__(null)
        self.regex, self.shown = re.compile(regex), shown

    def convert(self, value):
        if not isinstance(value, str) or not self.regex.fullmatch(value):
            raise _Refused
        return value

    def what(self):
        return self.shown


class List(_Type):
    """A non-empty list of values of one type."""

    def __init__(self, item):
        super().__init__()
        self.item = item

    def convert(self, value):
        if not isinstance(value, list) or not value:
            raise _Refused
        return [self.item.check(v) for v in value]

    def what(self):
        return f'a non-empty list, each {self.item}'


class AnyOf(_Type):
    """A value that one of the types allows (the first that does converts it)."""

    def __init__(self, *types):
        super().__init__()
        self.types = types

    def check(self, value):
        for t in self.types:
            try:
                return t.check(value)
            except _Refused:
                pass
        raise _Refused

    def what(self):
        return ' or '.join(map(str, self.types))


class Pair(List):
    """[low, high] of numbers with low < high (strict) or low <= high."""

    def __init__(self, item, strict):
        super().__init__(item)
        self.strict = strict

    def convert(self, value):
        if not isinstance(value, list) or len(value) != 2:
            raise _Refused
        lo, hi = (self.item.check(v) for v in value)
        if not (lo < hi if self.strict else lo <= hi):
            raise _Refused
        return [lo, hi]

    def what(self):
        return f"[low, high] with low {'<' if self.strict else '<='} high, each {self.item}"


# ----------------------------------------------------------------------------------------------------------------------
# The schema: every key of config.yaml (documented there) and what it may hold. tests/test_config.py checks that the
# two list the same keys.

SEED = Int('[0, 4294967295]')          # numpy seeds are 32-bit
POSITIVE_INT, COUNT = Int('(0, inf)'), Int('[0, inf)')
RATE, DECAY = Float('(0, inf)'), Float('[0, inf)')
CLIP = Float('(0, inf)', null=True)    # null: no gradient clipping
MASK_RATIO = Float('[0, 1)')           # the fraction of patches removed: some must stay visible
PROBABILITY = Float('[0, 1]')
AREA_FRACTIONS = Pair(Float('(0, 1]'), strict=False)
SIZE = Int('(0, inf)', null=True)      # null: the preset's value
LAYOUTS = ('synthetic_ct', 'synthetic_mri', 'synthetic_us', 'msd', 'csv', 'folder', 'medmnist')
SITE = Int('[0, 2]')                   # the built-in scanner sites (synthetic.SITES)
RUN_NAME = Pattern(r'(?!\s*$|\.\.?$)[^/\\\0]+', 'a plain folder name (not empty, . or .., no / or \\): the run folder '
                   'is <run.out_dir>/<name>')

SCHEMA = {
    'run.out_dir': Str(),
    'run.seed': SEED,
    'run.device': Pattern(r'auto|cpu|cuda(:\d+)?', 'auto, cpu, cuda or cuda:N'),
    'run.amp': Choice('auto', 'off', 'bf16', 'fp16'),
    'run.cache_dir': Str(),
    'run.log_every': POSITIVE_INT,
    'run.workers': COUNT,

    'model.preset': Choice('vit_tiny', 'vit_small', 'vit_base', 'vit_large', 'vit_huge', null=True),  # models.PRESETS
    'model.img_size': SIZE,
    'model.patch_size': SIZE,
    'model.in_chans': SIZE,
    'model.embed_dim': SIZE,
    'model.depth': SIZE,
    'model.num_heads': SIZE,
    'model.mlp_ratio': Float('(0, inf)', null=True),

    'mae.decoder_embed_dim': POSITIVE_INT,
    'mae.decoder_depth': POSITIVE_INT,
    'mae.decoder_num_heads': POSITIVE_INT,
    'mae.norm_pix_loss': Bool(),

    'dino.out_dim': POSITIVE_INT,
    'dino.hidden_dim': POSITIVE_INT,
    'dino.bottleneck_dim': POSITIVE_INT,
    'dino.warmup_teacher_temp': RATE,
    'dino.teacher_temp': RATE,
    'dino.warmup_teacher_temp_epochs': Int('[0, inf)'),
    'dino.student_temp': RATE,
    'dino.center_momentum': PROBABILITY,
    'dino.ema': PROBABILITY,
    'dino.freeze_last_layer': Int('[0, inf)'),
    'dino.global_crops_scale': AREA_FRACTIONS,
    'dino.local_crops': Int('[0, inf)'),
    'dino.local_crops_scale': AREA_FRACTIONS,
    'dino.local_crop_size': POSITIVE_INT,
    'dino.save': Choice('teacher', 'student'),

    'backbone.checkpoint': Str(null=True),
    'backbone.bootstrap.images': POSITIVE_INT,
    'backbone.bootstrap.medical': PROBABILITY,
    'backbone.bootstrap.epochs': POSITIVE_INT,
    'backbone.bootstrap.batch_size': POSITIVE_INT,
    'backbone.bootstrap.lr': RATE,
    'backbone.bootstrap.weight_decay': DECAY,
    'backbone.bootstrap.warmup_epochs': COUNT,
    'backbone.bootstrap.clip_grad': CLIP,
    'backbone.bootstrap.mask_ratio': MASK_RATIO,
    'backbone.bootstrap.seed': SEED,

    'peft.lora.r': COUNT,
    'peft.lora.alpha': Float('(0, inf)'),
    'peft.lora.dropout': Float('[0, 1)'),
    'peft.lora.layers': List(Str()),
    'peft.lora.qv_only': Bool(),
    'peft.adapter.kind': Choice('none', 'parallel', 'sequential'),
    'peft.adapter.dim': POSITIVE_INT,
    'peft.adapter.scale': Float('(0, inf)'),
    'peft.prompt.tokens': COUNT,
    'peft.prompt.deep': Bool(),

    'data.layout': Choice(*LAYOUTS),
    'data.root': Str(null=True),
    'data.site': SITE,
    'data.external_root': Str(null=True),
    'data.external_layout': Choice(*LAYOUTS, null=True),
    'data.external_site': SITE,
    'data.num_classes': Int('[2, inf)', null=True),
    'data.axis': Choice(0, 1, 2),
    'data.skip_empty': PROBABILITY,
    'data.intensity': AnyOf(Choice('auto', 'window', 'percentile', 'none'),
                            List(Choice('window', 'percentile', 'none'))),   # a list: one mode per input channel
    'data.window': Pair(Float('(-inf, inf)'), strict=True),
    'data.percentile': Pair(Float('[0, 100]'), strict=True),
    'data.mean': List(Float('(-inf, inf)')),
    'data.std': List(Float('(0, inf)')),
    'data.mask_suffix': Str(),
    'data.val_fraction': Float('(0, 1)'),
    'data.test_fraction': Float('(0, 1)'),
    'data.split_seed': COUNT,
    'data.label_fraction': Float('(0, 1]'),
    'data.label_seed': COUNT,
    'data.cache_mb': COUNT,
    'data.augment.crop_scale': AREA_FRACTIONS,
    'data.augment.hflip': PROBABILITY,
    'data.augment.vflip': PROBABILITY,
    'data.augment.rotate': Float('[0, 180]'),

    'pretrain.name': RUN_NAME,
    'pretrain.pretext': Choice('mae', 'dino'),
    'pretrain.epochs': POSITIVE_INT,
    'pretrain.batch_size': POSITIVE_INT,
    'pretrain.lr': RATE,
    'pretrain.weight_decay': DECAY,
    'pretrain.warmup_epochs': COUNT,
    'pretrain.clip_grad': CLIP,
    'pretrain.mask_ratio': MASK_RATIO,
    'pretrain.train_decoder': Bool(),
    'pretrain.decoder_warmup_steps': COUNT,
    'pretrain.grid_images': POSITIVE_INT,

    'finetune.name': Pattern(RUN_NAME.regex.pattern, RUN_NAME.shown, null=True),
    'finetune.init': Choice('tpp', 'random', 'full', 'linear', 'linear_tpp'),
    'finetune.targets': Str(null=True),
    'finetune.task': Choice('segmentation', 'classification'),
    'finetune.epochs': POSITIVE_INT,
    'finetune.batch_size': POSITIVE_INT,
    'finetune.lr': RATE,
    'finetune.weight_decay': DECAY,
    'finetune.warmup_epochs': COUNT,
    'finetune.clip_grad': CLIP,
    'finetune.pool': Choice('cls', 'mean'),
    'finetune.seg_channels': List(POSITIVE_INT),
    'finetune.merge_lora': Bool(),
    'finetune.save_predictions': Bool(),
}

TARGET_INITS = ('tpp', 'random', 'linear_tpp')   # the finetune.init methods that insert the targets
PRETRAINED_INITS = ('tpp', 'linear_tpp')          # those that load the pre-trained targets (TPP)


def _rules(cfg, stage):
    """The rules between keys, as (broken, message) pairs. stage: 0, 1 or 2 (the stage reading the config), or None."""
    d, peft, pre, model, mae = cfg['data'], cfg['peft'], cfg['pretrain'], cfg['model'], cfg['mae']
    targets = peft['lora']['r'] > 0 or peft['adapter']['kind'] != 'none' or peft['prompt']['tokens'] > 0
    yield (d['val_fraction'] + d['test_fraction'] >= 1,
           f"data.val_fraction + data.test_fraction must be < 1 (the rest trains), got {d['val_fraction']} + "
           f"{d['test_fraction']}")
    yield (not d['layout'].startswith('synthetic') and d['root'] is None,
           f"data.root must be set for data.layout {d['layout']} (docs/data.md)")
    # the external test set, which stage 2 evaluates when data.external_layout or external_root names one
    external = stage in (2, None) and (d['external_layout'] is not None or d['external_root'] is not None)
    ext_layout = d['external_layout'] or d['layout']
    ext_builtin = ext_layout.startswith('synthetic')
    yield (external and ext_builtin and d['external_root'] is not None,
           f"data.external_root: {d['external_root']} is set, but the external layout {ext_layout} is built in (it has "
           f"no root; data.external_site picks its site): set data.external_layout to msd, csv, folder or medmnist, "
           f"or external_root to null")
    yield (external and not ext_builtin and d['external_root'] is None,
           f'data.external_root: must be set for the external layout {ext_layout}')
    yield (external and ext_layout == d['layout'] and (d['external_site'] == d['site'] if ext_builtin
                                                      else d['external_root'] == d['root']),
           f"data.external_*: the external test set is the main data itself (data.layout {ext_layout}, the same "
           f"{'site' if ext_builtin else 'root'}); name a second data set (for a built-in layout: another "
           f"data.external_site)")
    for key in ('mean', 'std'):   # model.in_chans null follows the data: data.prepare checks the lengths then
        yield (model['in_chans'] is not None and len(d[key]) not in (1, model['in_chans']),
               f"data.{key} must have 1 or model.in_chans = {model['in_chans']} values, got {d[key]}")
    yield (mae['decoder_embed_dim'] % math.lcm(4, mae['decoder_num_heads']),
           f"mae.decoder_embed_dim must be a multiple of 4 (the sin-cos position table) and of mae.decoder_num_heads "
           f"= {mae['decoder_num_heads']}, got {mae['decoder_embed_dim']}")
    dino, size, patch, side = cfg['dino'], cfg['dino']['local_crop_size'], model['patch_size'], model['img_size']
    yield (pre['pretext'] == 'dino' and dino['local_crops'] > 0 and None not in (patch, side)
           and not (size % patch == 0 and patch <= size <= side),
           f"dino.local_crop_size must be a multiple of model.patch_size ({patch}) between {patch} and model.img_size "
           f"({side}), got {size}")
    yield (pre['decoder_warmup_steps'] > 0 and (pre['pretext'] != 'mae' or not pre['train_decoder']),
           f"pretrain.decoder_warmup_steps must be 0 unless pretrain.pretext is mae with pretrain.train_decoder true, "
           f"got {pre['decoder_warmup_steps']} (pretext {pre['pretext']}, train_decoder {pre['train_decoder']})")
    yield (not targets and (stage == 1 or stage != 0 and cfg['finetune']['init'] in TARGET_INITS),
           f"peft: no target parameters (peft.lora.r 0, peft.adapter.kind none, peft.prompt.tokens 0), but stage 1 "
           f"and finetune.init {', '.join(TARGET_INITS)} train them: set peft.lora.r > 0, an adapter kind or prompt "
           f"tokens (finetune.init full and linear need none)")


# ----------------------------------------------------------------------------------------------------------------------
# Loading: the reference config.yaml, then the user's file, then each --set; every value is checked as it is merged

def read_yaml(path):
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f'config file {path} does not exist')
    return _parse_yaml(path.read_text(), path) or {}


def _parse_yaml(text, source):
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f'{source}: not valid YAML: {e}') from None


def check_value(key, value, source):
    """The value of `key` as SCHEMA reads it (1e-3 as a float), or a ConfigError naming the key and what it allows."""
    try:
        return SCHEMA[key].check(value)
    except _Refused:
        raise ConfigError(f'{source}: {key} must be {SCHEMA[key]}, got {value!r}') from None


def _merge(ref, new, source, prefix=''):
    if not isinstance(new, dict):
        raise ConfigError(f"{source}: '{prefix.rstrip('.') or 'the file'}' must be a mapping of keys")
    out = copy.deepcopy(ref)
    for key, value in new.items():
        where = prefix + str(key)
        if key not in ref:
            raise ConfigError(f"{source}: unknown key '{where}' (keys here: {', '.join(ref)})")
        if isinstance(ref[key], dict):
            out[key] = _merge(ref[key], value, source, where + '.')
        else:
            out[key] = check_value(where, value, source)
    return out


def load_config(path, overrides=(), stage=None):
    """The effective config: the reference config.yaml, then the user's file, then each --set KEY=VALUE, every value
    checked against SCHEMA, then the rules between keys. stage (0, 1 or 2) is the stage that runs, for the rules
    that concern one stage only (stage 1 needs targets whatever finetune.init is; stage 0 none); None: any."""
    cfg = _merge(read_yaml(REFERENCE_CONFIG), read_yaml(path), str(path))
    for item in overrides:
        key, sep, value = item.partition('=')
        if not sep:
            raise ConfigError(f'--set {item}: expected KEY=VALUE, for example --set pretrain.lr=1e-3')
        nested = _parse_yaml(value, f'--set {item}')
        for part in reversed(key.split('.')):
            nested = {part: nested}
        cfg = _merge(cfg, nested, f'--set {item}')
    source = f"{path}{' with --set' if overrides else ''}"
    for broken, message in _rules(cfg, stage):
        if broken:
            raise ConfigError(f'{source}: {message}')
    return cfg
