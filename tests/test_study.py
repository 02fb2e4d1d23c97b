"""tools/study.py --quick end to end on the tiny config: the summary, table, CSVs and plots are written and agree
with the runs, every stage-1 variant is shared by the seeds, --tune picks the best validation lr, and a second
invocation resumes the matrix instead of starting over."""
import csv
import json
import shutil
from xml.etree import ElementTree

import numpy as np
import pytest
import yaml

import config
from conftest import tiny_config
from tools import study


@pytest.fixture(scope='module')
def quick(tmp_path_factory, cache):
    tmp = tmp_path_factory.mktemp('study')
    path = tiny_config(tmp, cache)
    argv = ['--config', str(path), '--quick', '--out', str(tmp / 'study'), '--set', 'finetune.epochs=2']
    out = study.main(study.parse_args(argv))
    return tmp, argv, out


def read_rows(out, name='runs.csv'):
    with open(out / name) as f:
        return list(csv.DictReader(f))


def test_quick_writes_table_and_csvs(quick):
    _, _, out = quick
    m = study.MATRIX['quick']
    rows = read_rows(out)
    stage1 = [r for r in rows if r['stage'] == '1']
    stage2 = [r for r in rows if r['stage'] == '2']
    datasets = {d for d, _ in m['pairs']}
    assert len(stage1) == len(datasets) * (len(m['sweep']['variants']) + len(m['methods']) - 1)   # shared by seeds
    per_seed = 2 * len(m['methods']) + len(m['references'][0.1]) + len(m['sweep']['variants']) - 1
    assert len(stage2) == len(m['pairs']) * len(m['fractions']) * len(m['seeds']) * per_seed
    assert all(r['status'] == 'ok' for r in rows)
    for r in stage2:
        metrics = json.loads((out / r['name'] / 'metrics.json').read_text())
        assert float(r['test_score']) == pytest.approx(metrics['test']['score'], abs=5e-5)   # its own, to 4 decimals
        assert r['val_curve'].split(';') == [f"{h['score']:.4f}" for h in metrics['history']]
        assert len(r['val_curve'].split(';')) == int(r['epochs']) == 2
        assert 1 <= int(r['converge_epoch']) <= 2
        assert int(r['trainable']) > 0
        cfg = yaml.safe_load((out / r['name'] / 'config.yaml').read_text())
        assert cfg['data']['label_seed'] == cfg['run']['seed'] == int(r['seed'])        # the labelled subset varies
        if r['variant']:                                                  # tpp and linear_tpp start from their targets
            assert cfg['finetune']['targets'].endswith(f"s1-{r['dataset']}-{r['method']}-{r['variant']}/targets.pth")

    s1 = {r['name']: yaml.safe_load((out / r['name'] / 'config.yaml').read_text())['pretrain'] for r in stage1}
    x1 = next(r for r in stage1 if r['name'] == 's1-ct-lora-x1')
    assert s1['s1-ct-lora-x4']['epochs'] == 4 * s1['s1-ct-lora-x1']['epochs']
    assert s1['s1-ct-lora-frozen']['train_decoder'] is False
    assert s1['s1-ct-lora-warmup']['decoder_warmup_steps'] == max(1, round(study.WARMUP_FRACTION * int(x1['steps'])))

    summary = json.loads((out / 'summary.json').read_text())
    by_key = {(c['data'], c['labels'], c['method'], c['init'], c['stage1_variant']): c for c in summary['cells']}
    assert {c['init'] for c in summary['cells']} == {'random', 'tpp', 'full', 'probe_backbone', 'probe_tpp'}
    for c in summary['cells']:
        runs = sorted((r for r in stage2 if (r['dataset'], r['task'], float(r['fraction']), r['init']) ==
                       (c['data'], c['task'], c['labels'], {v: k for k, v in study.INIT_NAMES.items()}[c['init']])
                       and (r['variant'] or None) == c['stage1_variant'] and (r['method'] if r['method'] != 'ref'
                                                                               else None) == c['method']),
                      key=lambda r: int(r['seed']))
        assert c['seeds'] == [int(r['seed']) for r in runs] == m['seeds']
        assert c['values'] == pytest.approx([float(r['test_score']) for r in runs], abs=5e-5)
        assert c['collapsed'] == sum(int(r['collapsed']) for r in runs)
        if c['init'] in ('tpp', 'probe_tpp'):                   # paired by seed against its reference cell
            ref = by_key[(c['data'], c['labels'], c['method'] if c['init'] == 'tpp' else None,
                          'random' if c['init'] == 'tpp' else 'probe_backbone', None)]
            diff = np.array(c['values']) - np.array(ref['values'])
            assert c['paired_diff_mean'] == pytest.approx(diff.mean())
            half = study.T975[len(diff) - 2] * diff.std(ddof=1) / np.sqrt(len(diff))
            assert c['paired_diff_ci95'] == pytest.approx([diff.mean() - half, diff.mean() + half])
            assert c['wins'] == int((diff > 0).sum())
    for key, p in summary['design']['primary'].items():     # the variant with the best mean validation metric
        d, task = key.split(':')
        cand = [c for c in summary['cells'] if (c['data'], c['task'], c['labels'], c['method'], c['init']) ==
                (d, task, m['sweep']['fraction'], 'lora', 'tpp')]
        assert len(cand) == len(m['sweep']['variants'])
        assert p['variant'] == max(cand, key=lambda c: (np.mean(c['val_values']), c['stage1_variant'] == 'x1'))[
            'stage1_variant']
    assert isinstance(summary['design']['health_holds'], bool)

    table = (out / 'results.md').read_text()
    for needle in ('Primary endpoint', 'probe_tpp', 'Health of the baselines', ' ± ', 'x4 ('):
        assert needle in table, needle
    for svg in ('effect_vs_stage1.svg', 'val_curves.svg'):
        assert ElementTree.parse(out / svg).getroot().tag.endswith('svg')
    with open(out / 'val_curves.csv') as f:
        curves = list(csv.DictReader(f))
    for r in curves:                                  # each point is the mean over seeds of the runs' own curves
        runs = [x for x in stage2 if (x['dataset'], x['task'], x['fraction'], x['method'], x['init'], x['variant']) ==
                (r['dataset'], r['task'], r['fraction'], r['method'], r['init'], r['variant'])]
        expected = sum(float(x['val_curve'].split(';')[int(r['epoch']) - 1]) for x in runs) / len(runs)
        assert int(r['n_seeds']) == len(runs) and abs(float(r['val_mean']) - expected) < 1e-4
    assert len(curves) == 2 * len(summary['cells'])


def test_tune_picks_the_best_validation_lr(tmp_path, cache):
    path = tiny_config(tmp_path, cache)
    out = tmp_path / 'tune'
    lrs = study.main(study.parse_args(['--config', str(path), '--quick', '--tune', '--out', str(out), '--pairs',
                                       'us:classification', '--set', 'finetune.epochs=1']))
    rows = read_rows(out, 'tune.csv')
    assert {float(r['lr']) for r in rows} == set(study.TUNE['peft']) | set(study.TUNE['full'])
    assert all(r['seed'] == str(study.TUNE['seed']) for r in rows)
    for kind, init in (('peft', 'random'), ('full', 'full')):
        best = max((r for r in rows if r['init'] == init), key=lambda r: float(r['val_score']))
        assert lrs[('us', 0.1)][kind] == float(best['lr'])


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
    with pytest.raises(config.UserError, match='another config'):
        study.main(study.parse_args(argv[:-1] + ['finetune.epochs=3']))


def test_convergence_epoch():
    assert study.converge_epoch([0.1, 0.5, 0.96, 1.0, 0.9]) == 3
    assert study.converge_epoch([0.8]) == 1
    assert study.converge_epoch([float('nan'), 0.2, 0.1]) == 2
    assert study.converge_epoch([]) is None
