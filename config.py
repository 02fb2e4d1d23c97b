"""The config and the errors a user can fix.

`load_config` reads the reference config.yaml (it documents, and gives a default for, every key), then the user's
file, then each --set KEY=VALUE, and checks every value before anything else runs. Every error a user causes (a
config value, a data file, a checkpoint, a run folder) is a `UserError`: the entry points print its message as one
`error: ...` line and exit with status 2 (engine.cli); any other exception is a bug and keeps its traceback.
"""
import copy
import math
from pathlib import Path

import yaml


class UserError(Exception):
    """A problem the user can fix. The message says what is wrong, where (key, file or case) and what to do."""


class ConfigError(UserError, ValueError):
    pass


REFERENCE_CONFIG = Path(__file__).with_name('config.yaml')   # documents, and gives a default for, every key


# ----------------------------------------------------------------------------------------------------------------------
# Config: the reference config.yaml is the schema; a user file and --set overrides may only change its keys

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


# Numbers a run cannot start with: budgets and rates must be finite and > 0, the rest >= 0 (0: none). Never null.
_TRAINING = ('backbone.bootstrap', 'pretrain', 'finetune')
_POSITIVE = {'run.log_every', 'backbone.bootstrap.images', 'peft.adapter.dim',
             *(f'{s}.{k}' for s in _TRAINING for k in ('epochs', 'batch_size', 'lr'))}
_NON_NEGATIVE = {'run.workers', 'peft.lora.r', 'pretrain.decoder_warmup_steps',
                 *(f'{s}.{k}' for s in _TRAINING for k in ('weight_decay', 'warmup_epochs'))}


def _check_number(key, value, source):
    if key in _POSITIVE or key in _NON_NEGATIVE:
        if value is None or not math.isfinite(value) or value < 0 or (value == 0 and key in _POSITIVE):
            raise ConfigError(f"{source}: {key} must be a finite number {'> 0' if key in _POSITIVE else '>= 0'}, "
                              f"got {value}")


def _coerce(value, ref, where):
    """Check a value against the reference value's type. YAML reads 1e-3 as a string, so numbers are accepted for
    float keys; null is accepted everywhere (it means 'default' or 'off' for the keys that allow it)."""
    if value is None or ref is None:
        return value
    if isinstance(ref, float) and not isinstance(value, bool):
        try:
            return float(value)
        except (TypeError, ValueError):
            pass
    elif isinstance(ref, bool) == isinstance(value, bool) and isinstance(value, type(ref)):
        return value
    raise ConfigError(f'{where}: expected {type(ref).__name__} like {ref!r}, got {value!r}')


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
            out[key] = _coerce(value, ref[key], f'{source}: {where}')
            _check_number(where, out[key], source)
    return out


def load_config(path, overrides=()):
    """The effective config: the reference config.yaml, then the user's file, then each --set KEY=VALUE."""
    cfg = _merge(read_yaml(REFERENCE_CONFIG), read_yaml(path), str(path))
    for item in overrides:
        key, sep, value = item.partition('=')
        if not sep:
            raise ConfigError(f'--set {item}: expected KEY=VALUE, for example --set pretrain.lr=1e-3')
        nested = _parse_yaml(value, f'--set {item}')
        for part in reversed(key.split('.')):
            nested = {part: nested}
        cfg = _merge(cfg, nested, f'--set {item}')
    return cfg
