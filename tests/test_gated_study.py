"""tools/gated_study.py --quick end to end on the tiny config: --tune's choices are the best validation settings,
stage 1 runs per seed, summary.json has the issue's schema and agrees with the runs, and a second invocation
re-runs nothing."""
import csv
import json

import numpy as np
import pytest
import torch
import yaml

import checkpoints
import config
import lora
import models
from conftest import tiny_config
from tools import gated_study as gs
from tools import study

CELL = {'data', 'task', 'labels', 'method', 'init', 'pretext', 'lr', 'metric', 'seeds', 'values', 'collapsed',
        'primary'}
TPP_CELL = {'stage1_seeds', 'paired_diff_mean', 'paired_diff_ci95', 'wins', 'target_survival', 'mde'}


@pytest.fixture(scope='module')
def quick(tmp_path_factory, cache):
    tmp = tmp_path_factory.mktemp('gated')
    argv = ['--config', str(tiny_config(tmp, cache)), '--quick', '--out', str(tmp / 'gated')]
    return argv, gs.main(gs.parse_args(argv))


def read_rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_tune_chooses_the_best_validation_setting(quick):
    _, out = quick
    m, rows = gs.MATRIX['quick'], read_rows(out / 'tune.csv')
    choice = json.loads((out / 'lr.json').read_text())
    assert {int(r['seed']) for r in rows} == set(m['tune_seeds'])            # seeds outside the study's
    assert not set(m['tune_seeds']) & set(m['seeds'])
    for d, _ in m['tasks']:
        for arm in ['random', 'probe', *gs.PRETEXTS] if d in m['probe'] else ['random', *gs.PRETEXTS]:
            cand = [r for r in rows if (r['stage'], r['dataset'], r['arm']) == ('2', d, arm)]
            assert len(cand) == len(m['lr_grid']) * (len(m['stage1_epochs'][d][gs.PRETEXTS[arm]])
                                                     if arm in gs.PRETEXTS else 1)
            variant = f"{gs.PRETEXTS[arm]}-e{choice['stage1_epochs'][d][arm]}" if arm in gs.PRETEXTS else ''
            chosen = next(r for r in cand if (float(r['lr']), r['variant']) == (gs.chosen_lr(choice, d, arm), variant))
            assert float(chosen['val_score']) == max(float(r['val_score']) for r in cand)   # (4 decimals in the CSV)
            assert choice['validation'][f'{d}:{arm}'] == pytest.approx(float(chosen['val_score']), abs=1e-4)
    assert set(choice['gate_on_validation']) == {'probe', 'update_ratio', 'passed'}


def test_quick_summary_schema(quick):
    _, out = quick
    m = gs.MATRIX['quick']
    summary = json.loads((out / 'summary.json').read_text())
    dsg, rows = summary['design'], read_rows(out / 'runs.csv')
    assert dsg['lr_choice'] == 'per-arm on validation'
    tasks = [f'{d}:{t}' for d, t in m['tasks']]
    assert set(dsg['gate']) == {'probe', 'update_ratio', 'passed'} and isinstance(dsg['gate']['passed'], bool)
    assert list(dsg['gate']['update_ratio']) == tasks and list(dsg['gate']['probe']) == ['us:classification']
    probe = [float(r['test_score']) for r in rows if r['arm'] == 'probe']
    assert dsg['gate']['probe']['us:classification'] == pytest.approx(np.mean(probe), abs=1e-4)
    random_ratio = [float(r['update_ratio']) for r in rows if r['arm'] == 'random' and r['dataset'] == 'us']
    assert dsg['gate']['update_ratio']['us:classification'] == pytest.approx(np.median(random_ratio), abs=1e-4)
    assert dsg['gate']['passed'] == (dsg['gate']['probe']['us:classification'] >= gs.GATE['probe_auc'] and
                                     max(dsg['gate']['update_ratio'].values()) <= gs.GATE['update_ratio'])

    cells = summary['cells']
    assert len(cells) == len(m['tasks']) * len(gs.ARMS) + len(m['probe'])           # no cell dropped
    for c in cells:
        assert CELL <= set(c), CELL - set(c)
        runs = sorted((r for r in rows if r['stage'] == '2' and r['dataset'] == c['data'] and
                       r['init'] == {v: k for k, v in study.INIT_NAMES.items()}[c['init']] and
                       (r['pretext'] or None) == c['pretext']), key=lambda r: int(r['seed']))
        assert c['seeds'] == [int(r['seed']) for r in runs] == m['seeds']
        assert c['values'] == pytest.approx([float(r['test_score']) for r in runs], abs=5e-5)
        assert c['primary'] == (c['init'] != 'probe_backbone')
        for r in runs:           # the labelled subset and the stage-1 run follow the seed
            cfg = yaml.safe_load((out / r['name'] / 'config.yaml').read_text())
            assert cfg['data']['label_seed'] == cfg['run']['seed'] == int(r['seed'])
            assert cfg['finetune']['lr'] == c['lr']
        if c['init'] == 'tpp':
            assert TPP_CELL <= set(c), TPP_CELL - set(c)
            assert c['stage1_seeds'] == c['seeds']
            assert set(c['target_survival']) == {'cosine', 'norm_ratio'}
            ref = next(x for x in cells if (x['data'], x['init']) == (c['data'], 'random'))
            diff = np.array(c['values']) - np.array(ref['values'])
            assert c['paired_diff_mean'] == pytest.approx(diff.mean())
            assert c['wins'] == int((diff > 0).sum())
            n, sd = len(diff), diff.std(ddof=1)
            assert c['mde'] == pytest.approx((study.T975[n - 2] + gs.T80[n - 2]) * sd / np.sqrt(n))
            for r in runs:
                s1 = yaml.safe_load((out / r['stage1'] / 'config.yaml').read_text())
                assert s1['pretrain']['pretext'] == c['pretext'] and s1['run']['seed'] == int(r['seed'])
    stage1 = [r for r in rows if r['stage'] == '1']
    assert len(stage1) == len(m['seeds']) * len(m['tasks']) * len(gs.PRETEXTS)     # re-run per seed
    for svg in ('effects.svg', 'val_curves.svg'):
        assert (out / svg).read_text().lstrip().startswith('<?xml')


def test_stage1_update_ratio_is_the_stage1_targets_update(quick, cache):
    """runs.csv's stage1_update_ratio, derived from metrics.json, equals ||s*B1A1|| / ||W|| of the targets file."""
    _, out = quick
    row = next(r for r in read_rows(out / 'runs.csv') if r['arm'] == 'tpp_mae')
    cfg = yaml.safe_load((out / row['stage1'] / 'config.yaml').read_text())
    backbone = models.build_backbone(cfg)
    checkpoints.load_checkpoint(backbone, cfg['backbone']['checkpoint'])
    lora.inject(backbone, cfg['peft'])
    lora.load_target_state_dict(backbone, torch.load(out / row['stage1'] / 'targets.pth')['targets'])
    direct = lora.update_ratio(backbone)['median']
    assert direct > 0 and float(row['stage1_update_ratio']) == pytest.approx(direct, rel=1e-3)


def test_results_md_has_the_gate_and_a_row_per_cell(quick):
    _, out = quick
    summary, md = json.loads((out / 'summary.json').read_text()), (out / 'results.md').read_text()
    assert f"Passed: **{'yes' if summary['design']['gate']['passed'] else 'no'}**" in md
    table = md.split('## Cells')[1].split('## Health')[0]
    rows = [line.split(' | ') for line in table.splitlines() if line.startswith('| ') and ':' in line.split(' | ')[0]]
    assert len(rows) == len(summary['cells'])
    for c, row in zip(summary['cells'], rows):
        assert row[4] == study.mean_std(c['values'])
        arm = {'random': 'random', 'probe_backbone': 'probe'}.get(c['init'], f"tpp_{c['pretext']}")
        first = [float(r['val_curve'].split(';')[0]) for r in read_rows(out / 'runs.csv')
                 if (r['stage'], r['dataset'], r['arm']) == ('2', c['data'], arm)]
        assert float(row[6]) == pytest.approx(np.mean(first), abs=1e-3)
        if c['pretext']:
            assert row[7] == study._diff(c).split(' | ')[0]


def test_second_invocation_reruns_nothing(quick, capsys):
    argv, out = quick
    before = read_rows(out / 'runs.csv')
    capsys.readouterr()
    gs.main(gs.parse_args(argv))
    log = capsys.readouterr().out
    assert log.count(': done,') == len(before) and ': ran,' not in log
    assert read_rows(out / 'runs.csv') == before


def test_study_needs_a_choice(tmp_path):
    with pytest.raises(config.UserError, match='--tune first'):
        gs.main(gs.parse_args(['--out', str(tmp_path)]))


def test_mde():
    assert gs.mde([0.1]) is None
    d = [0.01, 0.03, -0.02, 0.04, 0.0]
    assert gs.mde(d) == pytest.approx((2.776 + 0.941) * np.std(d, ddof=1) / np.sqrt(5))
