"""tools/study.py --quick end to end on the tiny config: the table and the CSVs are written, every stage-1 run is
shared, and a second invocation resumes the matrix instead of starting over."""
import csv
import json
import shutil

import pytest
import yaml

from conftest import tiny_config
from tools import study


@pytest.fixture(scope='module')
def quick(tmp_path_factory, cache):
    tmp = tmp_path_factory.mktemp('study')
    path = tiny_config(tmp, cache)
    argv = ['--config', str(path), '--quick', '--out', str(tmp / 'study'), '--set', 'finetune.epochs=2']
    out = study.main(study.parse_args(argv))
    return tmp, argv, out


def read_rows(out):
    with open(out / 'runs.csv') as f:
        return list(csv.DictReader(f))


def test_quick_writes_table_and_csvs(quick):
    _, _, out = quick
    m = study.MATRIX['quick']
    rows = read_rows(out)
    stage1 = [r for r in rows if r['stage'] == '1']
    stage2 = [r for r in rows if r['stage'] == '2']
    assert len(stage1) == len(m['methods'])                       # one per data set and method, shared
    per_cell = len(m['methods']) * len(m['inits']) + len(m['references'])
    assert len(stage2) == len(m['pairs']) * len(m['fractions']) * len(m['seeds']) * per_cell
    assert all(r['status'] == 'ok' for r in rows)
    for r in stage2:
        metrics = json.loads((out / r['name'] / 'metrics.json').read_text())
        assert float(r['test_score']) == pytest.approx(metrics['test']['score'], abs=5e-5)   # its own, to 4 decimals
        assert r['val_curve'].split(';') == [f"{h['score']:.4f}" for h in metrics['history']]
        assert len(r['val_curve'].split(';')) == int(r['epochs']) == 2
        assert 1 <= int(r['converge_epoch']) <= 2
        assert int(r['trainable']) > 0
    tpp = [r for r in stage2 if r['init'] == 'tpp']
    assert tpp and all(f"s1-ct-{r['method']}/targets.pth" in json.dumps(
        yaml.safe_load((out / r['name'] / 'config.yaml').read_text())['finetune']['targets']) for r in tpp)

    table = (out / 'results.md').read_text()
    for needle in ('lora tpp', 'adapter random', 'full fine-tuning', 'linear probe', 'TPP − random', ' ± ',
                   'acc 0.', 'Dice 0', 's1-ct-lora'):
        assert needle in table, needle
    with open(out / 'val_curves.csv') as f:
        curves = list(csv.DictReader(f))
    for r in curves:                                  # each point is the mean over seeds of the runs' own curves
        runs = [x for x in stage2 if (x['dataset'], x['task'], x['fraction'], x['method'], x['init']) ==
                (r['dataset'], r['task'], r['fraction'], r['method'], r['init'])]
        expected = sum(float(x['val_curve'].split(';')[int(r['epoch']) - 1]) for x in runs) / len(runs)
        assert int(r['n_seeds']) == len(runs) and abs(float(r['val_mean']) - expected) < 1e-4
    assert len(curves) == 2 * len({(x['dataset'], x['task'], x['fraction'], x['method'], x['init']) for x in stage2})


def test_second_invocation_resumes(quick, capsys, crash_after_checkpoint):
    tmp, argv, out = quick
    before = read_rows(out)
    assert not list(out.glob('*/checkpoint.pth')) and not list(out.glob('*/model.pth'))   # no --keep: deleted
    # a run interrupted after its first epoch's checkpoint: the next invocation resumes it and skips the others
    victim = next(r for r in before if r['stage'] == '2' and r['init'] == 'tpp')
    shutil.rmtree(out / victim['name'])
    with crash_after_checkpoint():
        study.main(study.parse_args(argv))
    assert (out / victim['name'] / 'checkpoint.pth').is_file()
    capsys.readouterr()
    study.main(study.parse_args(argv))
    log = capsys.readouterr().out
    assert f"{victim['name']}: resumed" in log
    assert log.count(': done,') == len(before) - 1
    after = {r['name']: r for r in read_rows(out)}
    assert after[victim['name']]['test_score'] == victim['test_score']        # exact resume, same numbers
    assert after[victim['name']]['val_curve'] == victim['val_curve']

    # a finished run made with other settings is never silently mixed in
    with pytest.raises(SystemExit, match='another config'):
        study.main(study.parse_args(argv[:-1] + ['finetune.epochs=3']))


def test_convergence_epoch():
    assert study.converge_epoch([0.1, 0.5, 0.96, 1.0, 0.9]) == 3
    assert study.converge_epoch([0.8]) == 1
    assert study.converge_epoch([float('nan'), 0.2, 0.1]) == 2
    assert study.converge_epoch([]) is None
