"""benchmark.py --quick end to end on a tiny model: the table, the CSV and the plot are written, every stage-1 run is
shared, and a second invocation resumes the matrix instead of starting over."""
import csv
import json
import shutil

import pytest
import yaml
from PIL import Image

import benchmark


@pytest.fixture(scope='module')
def quick(tmp_path_factory):
    tmp = tmp_path_factory.mktemp('bench')
    cfg = {   # tiny sizes, as tests/test_stages.py
        'run': {'cache_dir': str(tmp / 'cache'), 'log_every': 5},
        'model': {'preset': None, 'img_size': 32, 'patch_size': 8, 'embed_dim': 32, 'depth': 4, 'num_heads': 2,
                  'mlp_ratio': 2.0},
        'mae': {'decoder_embed_dim': 16, 'decoder_depth': 1, 'decoder_num_heads': 2},
        'backbone': {'bootstrap': {'images': 32, 'epochs': 1, 'batch_size': 16}},
        'peft': {'lora': {'r': 2}, 'adapter': {'dim': 4}},
        'pretrain': {'batch_size': 32},
        'finetune': {'seg_channels': [8, 8, 8], 'lr': 3e-3},
    }
    path = tmp / 'tiny.yaml'
    path.write_text(yaml.safe_dump(cfg))
    argv = ['--config', str(path), '--quick', '--out', str(tmp / 'bench'), '--set', 'finetune.epochs=2']
    out = benchmark.main(benchmark.parse_args(argv))
    return tmp, argv, out


def read_rows(out):
    with open(out / 'runs.csv') as f:
        return list(csv.DictReader(f))


def test_quick_writes_table_csv_and_plot(quick):
    _, _, out = quick
    m = benchmark.MATRIX['quick']
    rows = read_rows(out)
    stage1 = [r for r in rows if r['stage'] == '1']
    stage2 = [r for r in rows if r['stage'] == '2']
    assert len(stage1) == len(m['methods'])                       # one per data set and method, shared
    per_cell = len(m['methods']) * len(m['inits']) + len(m['references'])
    assert len(stage2) == len(m['pairs']) * len(m['fractions']) * len(m['seeds']) * per_cell
    assert all(r['status'] == 'ok' for r in rows)
    for r in stage2:
        assert 0 <= float(r['test_score']) <= 1 and len(r['val_curve'].split(';')) == int(r['epochs']) == 2
        assert 1 <= int(r['converge_epoch']) <= 2
        assert int(r['trainable']) > 0
    tpp = [r for r in stage2 if r['init'] == 'tpp']
    assert tpp and all(f"s1-ct-{r['method']}/targets.pth" in json.dumps(
        yaml.safe_load((out / r['name'] / 'config.yaml').read_text())['finetune']['targets']) for r in tpp)

    table = (out / 'results.md').read_text()
    for needle in ('lora tpp', 'adapter random', 'full fine-tuning', 'linear probe', 'TPP − random', ' ± ',
                   'acc 0.', 'Dice 0', 's1-ct-lora'):
        assert needle in table, needle
    img = Image.open(out / 'val_curves.png')
    assert img.size[0] > 300 and img.size[1] > 300 and len(img.getcolors(1 << 16) or []) > 4   # drawn, not blank


def test_second_invocation_resumes(quick, capsys, crash_after_checkpoint):
    tmp, argv, out = quick
    before = read_rows(out)
    assert not list(out.glob('*/checkpoint.pth')) and not list(out.glob('*/model.pth'))   # no --keep: deleted
    # a run interrupted after its first epoch's checkpoint: the next invocation resumes it and skips the others
    victim = next(r for r in before if r['stage'] == '2' and r['init'] == 'tpp')
    shutil.rmtree(out / victim['name'])
    with crash_after_checkpoint():
        benchmark.main(benchmark.parse_args(argv))
    assert (out / victim['name'] / 'checkpoint.pth').is_file()
    capsys.readouterr()
    benchmark.main(benchmark.parse_args(argv))
    log = capsys.readouterr().out
    assert f"{victim['name']}: resumed" in log
    assert log.count(': done,') == len(before) - 1
    after = {r['name']: r for r in read_rows(out)}
    assert after[victim['name']]['test_score'] == victim['test_score']        # exact resume, same numbers
    assert after[victim['name']]['val_curve'] == victim['val_curve']

    # a finished run made with other settings is never silently mixed in
    with pytest.raises(SystemExit, match='another config'):
        benchmark.main(benchmark.parse_args(argv[:-1] + ['finetune.epochs=3']))


def test_convergence_epoch():
    assert benchmark.converge_epoch([0.1, 0.5, 0.96, 1.0, 0.9]) == 3
    assert benchmark.converge_epoch([0.8]) == 1
    assert benchmark.converge_epoch([float('nan'), 0.2, 0.1]) == 2
    assert benchmark.converge_epoch([]) is None
