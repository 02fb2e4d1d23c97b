"""What the tests share: the one tiny config (4-block ViT on 32 px, seconds per stage on a CPU), a session-wide cache
(synthetic data and the tiny backbone are made once for the whole suite) and a crash simulator."""
import argparse
import contextlib
import sys
from pathlib import Path

import pytest
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # the project's top-level modules


def pytest_collection_modifyitems(config, items):
    """Tests marked cuda are skipped on a machine without a CUDA GPU."""
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason='needs a CUDA GPU')
        for item in items:
            if 'cuda' in item.keywords:
                item.add_marker(skip)


def tiny_config(tmp_path, cache, **sections):
    """Write the tiny config (runs under tmp_path/runs, data and backbone in `cache`) updated by `sections`, e.g.
    tiny_config(tmp_path, cache, finetune={'epochs': 1}); returns its path."""
    cfg = {
        'run': {'out_dir': str(tmp_path / 'runs'), 'cache_dir': str(cache), 'log_every': 5},
        'model': {'preset': None, 'img_size': 32, 'patch_size': 8, 'embed_dim': 32, 'depth': 4, 'num_heads': 2,
                  'mlp_ratio': 2.0},
        'mae': {'decoder_embed_dim': 16, 'decoder_depth': 1, 'decoder_num_heads': 2},
        'dino': {'out_dim': 64, 'hidden_dim': 32, 'bottleneck_dim': 16, 'local_crops': 2, 'local_crop_size': 16},
        'backbone': {'bootstrap': {'images': 64, 'epochs': 1, 'batch_size': 16}},
        'peft': {'lora': {'r': 2}, 'adapter': {'dim': 4}},
        'pretrain': {'epochs': 2, 'batch_size': 32},
        'finetune': {'epochs': 3, 'batch_size': 32, 'seg_channels': [16, 8, 8], 'lr': 3e-3},
    }
    for section, values in sections.items():
        cfg[section].update(values)
    path = tmp_path / 'tiny.yaml'
    path.write_text(yaml.safe_dump(cfg))
    return path


def args(path, *overrides, resume=False):
    """The command line of a stage script: --config path --set ... [--resume]."""
    return argparse.Namespace(config=str(path), set=list(overrides), resume=resume)


@pytest.fixture(scope='session')
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp('cache')        # synthetic data and the bootstrapped backbone, made once


@pytest.fixture
def crash_after_checkpoint(monkeypatch):
    """`with crash_after_checkpoint(): stage()` runs the stage until it has written its first checkpoint.pth, then
    stops it as a crash would (KeyboardInterrupt, which the block expects); after the block saving is normal again."""
    import runs
    save = runs.atomic_save

    def crash(obj, path):
        save(obj, path)
        if path.name == 'checkpoint.pth':
            raise KeyboardInterrupt('simulated crash')

    @contextlib.contextmanager
    def crashing():
        monkeypatch.setattr(runs, 'atomic_save', crash)
        with pytest.raises(KeyboardInterrupt):
            yield
        monkeypatch.setattr(runs, 'atomic_save', save)
    return crashing
