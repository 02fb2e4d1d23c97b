"""The gated TPP study: TPP (from MAE and from DINO) against random-init LoRA at 10% labels, with a regime gate and
per-arm learning rates, pre-registered in results/gated_study/design.md.

    python tools/gated_study.py --config config.yaml --tune     # choose each arm's lr and stage-1 epochs on validation
    python tools/gated_study.py --config config.yaml            # the study, with the choices of <out>/lr.json
    python tools/gated_study.py --config config.yaml --quick    # smoke test: both phases on a small matrix

--quick takes about 1 min with the tests' tiny model (tests/conftest.py tiny_config, as CI runs it) and about
4 min with config.yaml's (measured on 2 cores, AMD EPYC).

--tune runs the seeds TUNE_SEEDS (outside the study's): random LoRA and the backbone probe at each lr of the grid,
and per pretext stage 1 at each epoch budget of the grid followed by TPP at each lr. It picks per data set and arm
the setting with the best mean validation metric and writes tune.csv and lr.json (commit lr.json with the design).
The study then runs, per seed 0..9 and data set, stage 1 from MAE and from DINO with run.seed = the seed, the three
arms (random LoRA, TPP from MAE, TPP from DINO) and, on ultrasound, the probe (finetune.init linear) for the gate;
the labelled subset follows the seed (data.label_seed). It writes to --out:

    summary.json  {"design": {..., "gate": {"probe": ..., "update_ratio": ..., "passed": ...}, "lr_choice": ...},
                  "cells": [...]}: per cell the seeds, test values and collapsed runs; TPP cells paired with random
                  LoRA by seed (mean, 95% t-interval, wins), their stage-1 seeds, the median survival of the stage-1
                  update and the minimum detectable effect at that n (MDE)
    runs.csv      every run (stage 1 and stage 2), with update_ratio, survival, the stage-1 update's ratio and
                  validation curve
    results.md    the same as tables: per task every arm, the paired effects, MDE and survival; the gate; health
    effects.svg, val_curves.svg   TPP − random per task and pretext (95% CI); mean validation curves per arm

Runs execute in-process through tools/study.py's run_all: re-running the same command skips finished runs and
resumes interrupted ones, so the study can run in the background (nohup ... &) and survive interruptions.
"""
import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # the project's modules, from any folder
import config  # noqa: E402
import runs  # noqa: E402
from tools import study  # noqa: E402

# ----------------------------------------------------------------------------------------------------------------------
# The design (results/gated_study/design.md). Only study settings live here; model, backbone and the pretexts' own
# keys come from --config (and --set, which wins for every run).

DATASETS = {'ct': ['data.layout=synthetic_ct'],
            'us': ['data.layout=synthetic_us', 'data.intensity=percentile'],
            'mri': ['data.layout=synthetic_mri']}
ARMS = {'random': ('random', None), 'tpp_mae': ('tpp', 'mae'), 'tpp_dino': ('tpp', 'dino')}   # arm -> init, pretext
PRETEXTS = {arm: pretext for arm, (_, pretext) in ARMS.items() if pretext}   # the TPP arms
LORA = ['peft.adapter.kind=none', 'peft.prompt.tokens=0']
GATE = {'probe_auc': 0.70, 'update_ratio': 0.3}   # probe AUC at least, median ||s*BA|| / ||W|| at most
MATRIX = {
    'default': {
        'tasks': [('ct', 'segmentation'), ('us', 'classification'), ('mri', 'segmentation')],
        'probe': ['us'],                       # data sets of the gate's probe (classification)
        'fraction': 0.1,
        'seeds': list(range(10)),
        'tune_seeds': [100],                   # one: the budget (design.md)
        'lr_grid': [3e-3, 1e-2, 3e-2],         # every arm's stage-2 lr, and the probe's
        # per pretext: a DINO epoch (multi-crop through teacher and student) costs about five MAE epochs (design.md)
        'stage1_epochs': {'ct': {'mae': [6, 12], 'dino': [2, 4]}, 'us': {'mae': [30, 60], 'dino': [10, 20]},
                          'mri': {'mae': [6, 12], 'dino': [2, 4]}},
        'stage2': {'ct': ['finetune.epochs=10', 'finetune.batch_size=16'],
                   'us': ['finetune.epochs=40', 'finetune.batch_size=8'],
                   'mri': ['finetune.epochs=10', 'finetune.batch_size=16']},
    },
    'quick': {
        'tasks': [('us', 'classification'), ('mri', 'segmentation')],
        'probe': ['us'],
        'fraction': 0.1,
        'seeds': [0, 1],
        'tune_seeds': [100],
        'lr_grid': [1e-3, 1e-2],
        'stage1_epochs': {d: {p: [1, 2] if d == 'us' else [1] for p in ('mae', 'dino')} for d in DATASETS},
        'stage2': {d: ['finetune.epochs=1', 'finetune.batch_size=16'] for d in DATASETS},
    },
}
T80 = [1.376, 1.061, 0.978, 0.941, 0.920, 0.906, 0.896, 0.889, 0.883, 0.879, 0.876, 0.873, 0.870, 0.868, 0.866,
       0.865, 0.863, 0.862, 0.861, 0.860]   # Student t, 80% quantile, 1..20 degrees of freedom (80% power)
MDE = 'MDE = (t_{0.975,n-1} + t_{0.80,n-1}) * sd_diff / sqrt(n): the paired effect a two-sided 5% t-test detects ' \
      'with 80% power at n seeds, sd_diff the observed sd of TPP − random over seeds'
FIELDS = study.CSV_FIELDS + ['arm', 'pretext', 'stage1', 'stage1_seed', 'update_ratio', 'survival_cosine',
                             'survival_norm_ratio', 'stage1_update_ratio']


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--config', default='config.yaml', help='YAML config (keys documented in config.yaml)')
    p.add_argument('--set', action='append', default=[], metavar='KEY=VALUE', help='override for every run')
    p.add_argument('--out', default='runs/gated_study', help='folder of the run folders and the results')
    p.add_argument('--tune', action='store_true', help='choose lr and stage-1 epochs on validation: tune.csv, lr.json')
    p.add_argument('--lr', help='the choices to run with (default: <out>/lr.json, written by --tune)')
    p.add_argument('--quick', action='store_true', help='smoke test: --tune, then the study, on a small matrix')
    p.add_argument('--keep', action='store_true', help='keep checkpoint.pth, best.pth and model.pth of finished runs')
    p.add_argument('--verbose', action='store_true', help="show every run's progress lines (always in its log.txt)")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------------------------------------------
# Runs

def key(d, task):
    return f'{d}:{task}'


def stage1_run(d, pretext, epochs, seed):
    return {'stage': 1, 'dataset': d, 'method': 'lora', 'variant': '', 'pretext': pretext, 'epochs': epochs,
            'seed': seed, 'decoder': 'trained' if pretext == 'mae' else '',
            'name': f's1-{d}-{pretext}-e{epochs}-s{seed}'}


def stage2_run(d, task, m, arm, lr, seed, epochs=None, prefix=''):
    """A stage-2 run: an arm of ARMS at lr (TPP from the stage-1 run of `epochs` of the same seed) or the probe."""
    init, pretext = ARMS.get(arm, ('linear', None))
    s1 = stage1_run(d, pretext, epochs, seed)['name'] if pretext else ''
    tag = arm + (f'-e{epochs}' if pretext else '')
    return {'stage': 2, 'dataset': d, 'task': task, 'fraction': m['fraction'], 'seed': seed, 'lr': lr, 'arm': arm,
            'method': 'ref' if arm == 'probe' else 'lora', 'init': init, 'pretext': pretext, 'stage1': s1,
            'variant': f'{pretext}-e{epochs}' if pretext else '',
            'name': f'{prefix}{d}-{study.SHORT[task]}-{tag}-lr{lr:g}-s{seed}'}


def tune_plan(m):
    """Every tune run at each seed of tune_seeds: random LoRA and the probe per lr; per pretext and epoch budget the
    stage-1 run, then TPP per lr."""
    runs = []
    for seed in m['tune_seeds']:
        for d, task in m['tasks']:
            arms = ['random'] + (['probe'] if d in m['probe'] else [])
            runs += [stage2_run(d, task, m, arm, lr, seed, prefix='tune-') for arm in arms for lr in m['lr_grid']]
            for arm, pretext in PRETEXTS.items():
                for e in m['stage1_epochs'][d][pretext]:
                    runs.append(stage1_run(d, pretext, e, seed))
                    runs += [stage2_run(d, task, m, arm, lr, seed, e, 'tune-') for lr in m['lr_grid']]
    return runs


def plan(m, choice):
    """The study, seed by seed (an interrupted study has whole seeds): per data set stage 1 from each pretext with
    run.seed = the seed at its chosen epochs, then the three arms and the probe at their chosen lr."""
    runs = []
    for seed in m['seeds']:
        for d, task in m['tasks']:
            epochs = choice['stage1_epochs'][d]
            runs += [stage1_run(d, pretext, epochs[arm], seed) for arm, pretext in PRETEXTS.items()]
            arms = list(ARMS) + (['probe'] if d in m['probe'] else [])
            runs += [stage2_run(d, task, m, arm, chosen_lr(choice, d, arm), seed, epochs.get(arm)) for arm in arms]
    return runs


def chosen_lr(choice, d, arm):
    return choice['probe_lr'][d] if arm == 'probe' else choice['lr'][d][arm]


def overrides(run, m, user_sets, out, backbone):
    """--set list of one run: the data set's and the matrix's settings, the user's, then what the study controls."""
    d = run['dataset']
    sets = DATASETS[d] + LORA
    sets += ([f"pretrain.pretext={run['pretext']}", f"pretrain.epochs={run['epochs']}"] if run['stage'] == 1
             else m['stage2'][d] + [f"finetune.lr={run['lr']}"])
    sets += user_sets + [f'run.out_dir={out}', f'backbone.checkpoint={backbone}', f"run.seed={run['seed']}"]
    if run['stage'] == 1:
        return sets + [f"pretrain.name={run['name']}"]
    sets += [f"finetune.name={run['name']}", f"finetune.init={run['init']}", f"finetune.task={run['task']}",
             f"data.label_fraction={run['fraction']}", f"data.label_seed={run['seed']}"]
    return sets + ([f"finetune.targets={out / run['stage1'] / 'targets.pth'}"] if run['stage1'] else [])


def run_rows(runs, args, m, out):
    """Run (or skip, or resume) every run through study.run_all; rows with the LoRA diagnostics and stage-1 seed."""
    rows = study.run_all(runs, args, m, out, sets_of=overrides, datasets=DATASETS)
    for run, row in zip(runs, rows):
        row.update(arm=run.get('arm', ''), pretext=run.get('pretext') or '', stage1=run.get('stage1', ''))
        if run['stage'] == 2 and row['status'] == 'ok':
            mt = json.loads((run['dir'] / 'metrics.json').read_text())
            row['update_ratio'] = mt.get('update_ratio', {}).get('median', '')
            survival = mt.get('target_survival', {})
            row.update(survival_cosine=survival.get('cosine', ''), survival_norm_ratio=survival.get('norm_ratio', ''))
            if survival:   # ||s*B1A1|| / ||W|| = (||s*BA|| / ||W||) / (||s*BA|| / ||s*B1A1||) per layer; 4 digits
                ratio = _median([mt['update_ratio']['per_layer'][k] / v['norm_ratio']
                                 for k, v in survival['per_layer'].items()])
                row['stage1_update_ratio'] = f'{ratio:.4g}'
            if run['stage1']:   # the seed the stage-1 run was made with, as its config.yaml records it
                saved = yaml.safe_load((out / run['stage1'] / 'config.yaml').read_text())
                row['stage1_seed'] = saved['run']['seed']
    return rows


# ----------------------------------------------------------------------------------------------------------------------
# --tune: the choices on validation

def choose(rows, m):
    """Per data set and arm the (stage-1 epochs, lr) with the best mean validation metric over the tune seeds (ties:
    the first in grid order); a setting with a diverged run is never chosen."""
    means = {}
    for r in rows:
        if r['stage'] == 2:
            k = (r['dataset'], r['arm'], r['variant'], r['lr'])
            means.setdefault(k, []).append(r['val_score'] if r['status'] == 'ok' else -math.inf)
    best = {}
    for (d, arm, variant, lr), vals in means.items():
        score = float(np.mean(vals))
        if (d, arm) not in best or score > best[(d, arm)][0]:
            best[(d, arm)] = (score, variant, lr)
    choice = {'seeds': m['tune_seeds'], 'lr_grid': m['lr_grid'], 'stage1_epochs_grid': m['stage1_epochs'],
              'lr': {}, 'stage1_epochs': {}, 'probe_lr': {}, 'validation': {}}
    for (d, arm), (score, variant, lr) in best.items():
        if arm == 'probe':
            choice['probe_lr'][d] = lr
        else:
            choice['lr'].setdefault(d, {})[arm] = lr
            if variant:
                choice['stage1_epochs'].setdefault(d, {})[arm] = int(variant.split('-e')[1])
        choice['validation'][f'{d}:{arm}'] = round(score, 4)
    return choice


def tune(args, m, out):
    rows = run_rows(tune_plan(m), args, m, out)
    study.write_csv(rows, out / 'tune.csv', FIELDS)
    choice = choose(rows, m)
    chosen = [r for r in rows if r['arm'] in ('random', 'probe')
              and r['lr'] == chosen_lr(choice, r['dataset'], r['arm'])]
    choice['gate_on_validation'] = gate(chosen, m, 'val_score')   # a first reading, before any test run
    (out / 'lr.json').write_text(json.dumps(choice, indent=1) + '\n')
    print(f"gated study --tune: {out / 'tune.csv'} | {out / 'lr.json'}: lr {choice['lr']}, probe lr "
          f"{choice['probe_lr']}, stage-1 epochs {choice['stage1_epochs']}", flush=True)
    return choice


# ----------------------------------------------------------------------------------------------------------------------
# The summary

def _median(values):
    v = [float(x) for x in values if x != '' and x is not None and math.isfinite(float(x))]
    return float(np.median(v)) if v else None


def gate(rows, m, score='test_score'):
    """The regime gate: the probe's mean AUC per probe data set and random LoRA's median update_ratio (over seeds
    of the per-run median over layers) per task, and whether both thresholds of GATE hold everywhere."""
    ok = [r for r in rows if r['stage'] == 2 and r['status'] == 'ok']
    probe = {key(d, t): study.finite_mean([r[score] for r in ok if r['dataset'] == d and r['arm'] == 'probe'])
             for d, t in m['tasks'] if d in m['probe']}
    ratio = {key(d, t): _median([r['update_ratio'] for r in ok if r['dataset'] == d and r['arm'] == 'random'])
             for d, t in m['tasks']}
    passed = (all(v is not None and v >= GATE['probe_auc'] for v in probe.values())
              and all(v is not None and v <= GATE['update_ratio'] for v in ratio.values()))
    return {'probe': probe, 'update_ratio': ratio, 'passed': passed}


def mde(diffs):
    """Minimum detectable paired effect at 80% power (MDE above) from the observed differences."""
    n = len(diffs)
    if n < 2:
        return None
    df = min(n - 1, len(T80)) - 1
    return float((study.T975[df] + T80[df]) * np.std(diffs, ddof=1) / math.sqrt(n))


def summarise(rows, m, choice):
    """summary.json: one cell per (task, arm) and the probe's, TPP paired with random LoRA by seed; the design."""
    s2 = [r for r in rows if r['stage'] == 2]
    cells = []
    for d, task in m['tasks']:
        arms = list(ARMS) + (['probe'] if d in m['probe'] else [])
        base = {r['seed']: r['test_score'] for r in s2 if (r['dataset'], r['arm']) == (d, 'random')
                and r['status'] == 'ok'}
        for arm in arms:
            rs = sorted((r for r in s2 if (r['dataset'], r['arm']) == (d, arm)), key=lambda r: r['seed'])
            good = [r for r in rs if r['status'] == 'ok']
            init, pretext = ARMS.get(arm, ('linear', None))
            cell = {'data': d, 'task': task, 'arm': arm, 'labels': m['fraction'],
                    'method': None if arm == 'probe' else 'lora',
                    'init': study.INIT_NAMES[init], 'pretext': pretext, 'lr': rs[0]['lr'] if rs else None,
                    'metric': good[0]['metric'] if good else None, 'seeds': [r['seed'] for r in good],
                    'values': [r['test_score'] for r in good], 'collapsed': sum(r['collapsed'] for r in good),
                    'diverged': len(rs) - len(good), 'primary': arm in ARMS,
                    'mean': study.finite_mean([r['test_score'] for r in good])}
            if arm == 'random':
                cell['update_ratio'] = _median([r['update_ratio'] for r in good])
            if pretext:
                mine = {r['seed']: r['test_score'] for r in good}
                cell.update(stage1_epochs=choice['stage1_epochs'][d][arm],
                            stage1_seeds=[r['stage1_seed'] for r in good], **study.paired(mine, base),
                            paired_against='random',
                            mde=mde([mine[s] - base[s] for s in sorted(set(mine) & set(base))]),
                            target_survival={'cosine': _median([r['survival_cosine'] for r in good]),
                                             'norm_ratio': _median([r['survival_norm_ratio'] for r in good])},
                            stage1_update_ratio=_median([r['stage1_update_ratio'] for r in good]))
            cells.append(cell)
    return {'design': design(rows, cells, m, choice), 'cells': cells}


def design(rows, cells, m, choice):
    g = gate(rows, m)
    health = []
    for d, task in m['tasks']:
        for c in cells:
            if (c['data'], c['init']) == (d, 'random'):
                health.append({'criterion': 'random LoRA: no collapsed run', 'data': d, 'value': c['collapsed'],
                               'holds': c['collapsed'] == 0})
            if c['data'] == d and c['primary']:
                health.append({'criterion': ' '.join(filter(None, [c['init'], c['pretext']])) + ': no diverged run',
                               'data': d, 'value': c['diverged'], 'holds': c['diverged'] == 0})
    return {'question': 'Does TPP (stage-1 pre-trained LoRA targets) beat random-init LoRA at 10% labels when PEFT '
                        'adapts a backbone worth adapting?',
            'tasks': [key(d, t) for d, t in m['tasks']], 'labels': m['fraction'], 'arms': list(ARMS),
            'seeds': m['seeds'], 'tune_seeds': m['tune_seeds'], 'lr': choice['lr'], 'probe_lr': choice['probe_lr'],
            'stage1_epochs': choice['stage1_epochs'], 'lr_choice': 'per-arm on validation',
            'gate_thresholds': {'probe_auc_min': GATE['probe_auc'], 'update_ratio_max': GATE['update_ratio']},
            'gate': g, 'gate_note': None if g['passed'] else 'GATE NOT PASSED: the study ran outside the regime it '
                                                             'was designed for; every result is marked as such',
            'primary_endpoint': 'test metric of TPP − random LoRA at 10% labels, paired by seed, per task and '
                                'pretext, with a 95% t-interval',
            'decision_rule': 'TPP helps in a task if the interval\'s lower bound is above 0',
            'mde_formula': MDE, 'health': health, 'health_holds': all(h['holds'] for h in health),
            'no_cell_dropped': True, 'machine': study.machine()}


# ----------------------------------------------------------------------------------------------------------------------
# The report: results.md and two plots (SVG)

def _first_val(rows, cell):
    """Mean validation metric after stage 2's first epoch over the cell's runs: where each arm starts."""
    return study.finite_mean([float(r['val_curve'].split(';')[0]) for r in rows if r['stage'] == 2 and
                              r['status'] == 'ok' and (r['dataset'], r['arm']) == (cell['data'], cell['arm'])])


def write_markdown(summary, rows, path):
    dsg, fmt = summary['design'], lambda v: '–' if v is None else f'{v:.3f}'
    g = dsg['gate']
    lines = ['# Gated study: every cell', '', f"Machine: {dsg['machine']}. Seeds {dsg['seeds'][0]}-{dsg['seeds'][-1]}, "
             f"{dsg['labels']:.0%} labels, LoRA. Written by `tools/gated_study.py` from `runs.csv`.", '',
             '## Regime gate', '', f"Passed: **{'yes' if g['passed'] else 'no'}** (probe AUC >= "
             f"{GATE['probe_auc']}, random LoRA's median update ratio <= {GATE['update_ratio']}).", '',
             '| task | probe AUC | update ratio (random LoRA) |', '|---|---|---|']
    lines += [f"| {t} | {fmt(g['probe'].get(t))} | {fmt(g['update_ratio'][t])} |" for t in dsg['tasks']]
    lines += ['', '## Cells', '', 'Test metric mean ± sd over seeds; *val, epoch 1*: mean validation metric after '
              'the first stage-2 epoch. TPP rows: TPP − random LoRA paired by seed [95% t-interval], wins, the '
              'minimum detectable effect (80% power), the size of the stage-1 update (||s·B1A1|| / ||W||) and its '
              'survival in the final one (cosine, norm ratio); medians over seeds of per-layer medians. Random rows: '
              'the final update ratio ||s·BA|| / ||W||.', '',
              '| task | arm | stage-1 epochs | lr | test | collapsed | val, epoch 1 | TPP − random [95% CI] | wins | '
              'MDE | update ratio | survival cos | final / stage-1 norm |',
              '|---|---|---|---|---|---|---|---|---|---|---|---|---|']
    for c in summary['cells']:
        diff, surv = study._diff(c).split(' | ') + [''], c.get('target_survival') or {}
        row = [f"{c['data']}:{c['task']}", c['init'] + (f" ({c['pretext']})" if c['pretext'] else ''),
               c.get('stage1_epochs', ''), c['lr'], study.mean_std(c['values']),
               f"{c['collapsed']}/{len(c['values'])}", fmt(_first_val(rows, c)), diff[0], diff[1]]
        row += ([fmt(c['mde']), f"{c['stage1_update_ratio']:.2g} (stage 1)", fmt(surv['cosine']),
                 fmt(surv['norm_ratio'])] if c['pretext'] else ['', fmt(c.get('update_ratio')), '', ''])
        lines.append('| ' + ' | '.join(map(str, row)) + ' |')
    lines += ['', '## Health of the baselines', ''] + study.health_table(dsg['health'])
    Path(path).write_text('\n'.join(lines) + '\n')


def write_plots(summary, rows, out):
    """effects.svg: TPP − random (paired, 95% CI) per task, one series per pretext; val_curves.svg: the mean
    validation curve of each arm per task."""
    tasks = summary['design']['tasks']
    effect = []
    for pretext in ('mae', 'dino'):
        cs = [c for c in summary['cells'] if c['pretext'] == pretext and c.get('paired_diff_ci95')]
        if cs:
            effect.append((f'TPP from {pretext.upper()}', [tasks.index(key(c['data'], c['task'])) for c in cs],
                           [c['paired_diff_mean'] for c in cs], [c['paired_diff_ci95'] for c in cs]))
    if effect:
        study.line_plot(out / 'effects.svg', 'TPP − random LoRA, 10% labels (test, 95% CI)', 'task', 'TPP − random',
                        effect, zero=True, xticks=tasks)
    curves = []
    for t in tasks:
        d = t.split(':')[0]
        for arm in ARMS:
            rs = [r for r in rows if r['stage'] == 2 and (r['dataset'], r['arm']) == (d, arm) and r['status'] == 'ok']
            if rs:
                arr = np.array([[float(x) for x in r['val_curve'].split(';')] for r in rs])
                curves.append((f'{t} {arm}', list(range(1, arr.shape[1] + 1)), list(np.nanmean(arr, 0)), None))
    if curves:
        study.line_plot(out / 'val_curves.svg', 'validation metric, LoRA, 10% labels (mean over seeds)', 'epoch',
                        'validation metric', curves)


# ----------------------------------------------------------------------------------------------------------------------

def load_choice(args, out):
    path = Path(args.lr) if args.lr else out / 'lr.json'
    if not path.is_file():
        raise config.UserError(f'{path}: no learning-rate choice; run --tune first (or pass --lr <lr.json>)')
    return json.loads(path.read_text())


def main(args):
    m = MATRIX['quick' if args.quick else 'default']
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.tune or args.quick and not args.lr and not (out / 'lr.json').is_file():
        choice = tune(args, m, out)
        if args.tune:
            return choice
    choice = load_choice(args, out)
    runs = plan(m, choice)
    print(f'gated study: {len(runs)} runs ({sum(r["stage"] == 1 for r in runs)} stage 1) into {out}', flush=True)
    rows = run_rows(runs, args, m, out)
    study.write_csv(rows, out / 'runs.csv', FIELDS)
    summary = summarise(rows, m, choice)
    (out / 'summary.json').write_text(json.dumps(summary, indent=1) + '\n')
    write_markdown(summary, rows, out / 'results.md')
    write_plots(summary, rows, out)
    g = summary['design']['gate']
    print(f"gated study: gate {'passed' if g['passed'] else 'NOT passed'} (probe {g['probe']}, update_ratio "
          f"{g['update_ratio']}) | {out / 'summary.json'} | {out / 'runs.csv'}", flush=True)
    return out


if __name__ == '__main__':
    runs.exit_on_user_error(main, parse_args())
