"""The TPP study: TPP against plain PEFT (the same targets from random init), with full fine-tuning and head-only
probes as references, pre-registered in results/study/design.md.

    python tools/study.py --config config.yaml [--quick] [--out runs/study] [--set key=value ...]
    python tools/study.py --config config.yaml --tune        # the baselines' learning rates, on validation only

Runs a matrix of cells (data set x task x label fraction x method x init, each with several seeds) in-process by
calling pretrain_targets.main and finetune.main, one run folder per run under --out. The seed varies the labelled
subset too (data.label_seed). For the swept method and fraction, TPP also runs from stage-1 variants: 0.25x and 4x
the stage-1 budget, and the MAE decoder frozen or warmed up then frozen (VARIANTS). It writes to --out:

    summary.json  one cell per (data, task, labels, method, init, stage-1 steps, decoder): seeds, test values,
                  collapsed runs, TPP − reference paired by seed with a 95% t-interval and wins; the design, the
                  primary endpoint (the variant chosen on validation) and the baselines' health criteria
    results.md    the same as tables
    runs.csv      every run (stage 1 and stage 2), with its validation curve
    val_curves.csv, val_curves.svg, effect_vs_stage1.svg   mean validation curves; TPP − random against stage-1
                  steps (matplotlib: requirements-tools.txt; every run's TensorBoard events hold its curves too:
                  tensorboard --logdir <out>)

Every stage-1 run (one per data set, method and variant, seed 0) is shared by all the stage-2 runs that use it:
the targets are pre-trained once, on all the training images (labels unused), whatever the label fraction or seed.
Every run uses the same backbone: the config's (the shipped default unless backbone.checkpoint is set).

Resuming: run it again with the same arguments. Finished runs (metrics.json / targets.pth) are skipped, an
interrupted run folder with a checkpoint is resumed exactly, one without a checkpoint is restarted. A finished run
whose saved config differs from what this invocation would use is an error (use another --out or delete it).
A finished run keeps its metrics, log, config and TensorBoard events (and stage 1 its targets); its checkpoints and
model files (tens of MB each) are deleted unless --keep.

Your own data: --pairs config:segmentation uses the data section of --config / --set as it is (e.g. --set
data.layout=msd --set data.root=...). --set overrides apply to every run and win over the matrix's settings below.
"""
import argparse
import contextlib
import csv
import io
import json
import math
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # the project's modules, from any folder
import config  # noqa: E402
import data  # noqa: E402
import engine  # noqa: E402
import finetune  # noqa: E402
import pretrain_backbone  # noqa: E402
import pretrain_targets  # noqa: E402
import runs  # noqa: E402
from tools import speed  # noqa: E402

# ----------------------------------------------------------------------------------------------------------------------
# The matrix (pre-registered in results/study/design.md). Only study settings live here; everything else comes from
# --config (and --set, which wins). Keep model / mae / backbone keys out of it: every run must share one backbone.

DATASETS = {                     # name -> overrides selecting the data
    'ct': ['data.layout=synthetic_ct'],                                  # CT-like volumes, 64 cases
    'us': ['data.layout=synthetic_us', 'data.intensity=percentile'],     # ultrasound-like 2D images, 300
    'config': [],                # the data section of --config / --set as it is (your own data)
}
METHODS = {                      # PEFT method -> overrides selecting the targets (their sizes come from the config)
    'lora': ['peft.adapter.kind=none'],
    'adapter': ['peft.lora.r=0', 'peft.adapter.kind=parallel'],
    'prompt': ['peft.lora.r=0', 'peft.adapter.kind=none', 'peft.prompt.tokens=8'],   # VPT, shallow unless --set
}
PAIRS = [('ct', 'classification'), ('ct', 'segmentation'), ('us', 'classification'), ('us', 'segmentation')]

# Stage-1 variants of the swept method's targets: (multiple of the 1x epochs, decoder policy). Every other TPP run
# uses 'x1'. The warm-up variant trains the decoder for the first quarter of x1's steps, then freezes it.
VARIANTS = {'x1': (1, 'trained'), 'x0.25': (0.25, 'trained'), 'x4': (4, 'trained'),
            'frozen': (1, 'frozen'), 'warmup': (1, 'warmup')}
WARMUP_FRACTION = 0.25
# Labels for results/study/summary.json: finetune.init -> study init
INIT_NAMES = {'random': 'random', 'tpp': 'tpp', 'full': 'full', 'linear': 'probe_backbone', 'linear_tpp': 'probe_tpp'}

MATRIX = {
    # results/study/design.md: budgets fixed before any TPP run; learning rates chosen on validation by --tune.
    'default': {
        'pairs': [('ct', 'segmentation'), ('us', 'classification')],
        'fractions': [0.1, 1.0],
        'seeds': [0, 1, 2, 3, 4],
        'methods': ['lora', 'adapter'],
        # per label fraction; linear / linear_tpp: the head alone on the frozen backbone without / with the TPP targets
        'references': {0.1: ['full', 'linear', 'linear_tpp'], 1.0: ['full']},
        'sweep': {'method': 'lora', 'fraction': 0.1, 'variants': list(VARIANTS)},
        'stage1': {'ct': 12, 'us': 60, 'config': 10},      # 1x epochs (CT 192 steps, US 120)
        'stage2': {('ct', 0.1): ['finetune.epochs=10', 'finetune.batch_size=16'],   # 4 volumes: ~70 steps
                   ('ct', 1.0): ['finetune.epochs=3'],                             # 38 volumes: ~100 steps
                   ('us', 0.1): ['finetune.epochs=40', 'finetune.batch_size=8'],    # 18 images: 80 steps
                   ('us', 1.0): ['finetune.epochs=12'],                            # 180 images: 60 steps
                   ('config', 0.1): [], ('config', 1.0): []},
        # (data set, fraction) -> lr of the PEFT and head-only runs / of full fine-tuning: --tune's choice on validation
        'lr': {('ct', 0.1): {'peft': 3e-2, 'full': 3e-2}, ('ct', 1.0): {'peft': 3e-2, 'full': 3e-2},
               ('us', 0.1): {'peft': 1e-2, 'full': 1e-3}, ('us', 1.0): {'peft': 1e-2, 'full': 3e-3}},
    },
    'quick': {                   # smoke test: every code path, few runs; sizes still come from the config
        'pairs': [('ct', 'segmentation'), ('us', 'classification')],
        'fractions': [0.1],
        'seeds': [0, 1],
        'methods': ['lora', 'adapter'],
        'references': {0.1: ['full', 'linear', 'linear_tpp']},
        'sweep': {'method': 'lora', 'fraction': 0.1, 'variants': list(VARIANTS)},
        'stage1': {d: 1 for d in DATASETS},
        'stage2': {(d, f): ['finetune.epochs=2', 'finetune.batch_size=16'] for d in DATASETS for f in (0.1, 1.0)},
        'lr': {},
    },
}
TUNE = {'seed': 100, 'peft': [3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1], 'full': [1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1]}   # a seed outside the study's
CONVERGED = 0.95                 # convergence: first epoch whose validation metric reaches 95% of the run's best
SHORT = {'classification': 'cls', 'segmentation': 'seg'}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--config', default='config.yaml', help='YAML config (keys documented in config.yaml)')
    p.add_argument('--set', action='append', default=[], metavar='KEY=VALUE',
                   help='override for every run (wins over the matrix), e.g. run.device=cuda')
    p.add_argument('--out', default='runs/study', help='folder of the run folders and the results')
    p.add_argument('--quick', action='store_true', help='the small smoke-test matrix')
    p.add_argument('--tune', action='store_true', help="choose the baselines' learning rates on validation "
                   '(random-init PEFT and full fine-tuning, one seed outside the study) and write tune.csv')
    p.add_argument('--pairs', help="comma-separated data:task pairs, e.g. ct:classification,config:segmentation "
                   "(data: ct, us, or config = the data of --config/--set, your own), or 'all' (ct and us, both tasks)")
    p.add_argument('--fractions', help='comma-separated label fractions, e.g. 0.1,1.0')
    p.add_argument('--seeds', type=int, help='number of seeds (0..N-1)')
    p.add_argument('--methods', help=f"comma-separated PEFT methods of the matrix ({', '.join(METHODS)})")
    p.add_argument('--keep', action='store_true', help='keep checkpoint.pth, best.pth and model.pth of finished runs')
    p.add_argument('--verbose', action='store_true', help="show every run's progress lines (always in its log.txt)")
    return p.parse_args(argv)


def select(args):
    """The matrix to run: the default or quick table, narrowed by the command line."""
    m = dict(MATRIX['quick' if args.quick else 'default'])
    if args.pairs:
        m['pairs'] = PAIRS if args.pairs == 'all' else [tuple(p.split(':', 1)) for p in args.pairs.split(',')]
    if args.fractions:
        m['fractions'] = [float(f) for f in args.fractions.split(',')]
    if args.seeds:
        m['seeds'] = list(range(args.seeds))
    if args.methods:
        m['methods'] = args.methods.split(',')
        if not set(m['methods']) <= set(METHODS):
            raise config.UserError(f"--methods: {args.methods} is not a list of {', '.join(METHODS)}")
    for pair in m['pairs']:
        if len(pair) != 2 or pair[0] not in DATASETS or pair[1] not in SHORT:
            raise config.UserError(f"--pairs: '{':'.join(pair)}' is not data:task with data one of "
                                   f"{', '.join(DATASETS)} and task classification or segmentation")
    return m


# ----------------------------------------------------------------------------------------------------------------------
# Runs

def frac_tag(f):
    return f'l{100 * f:g}'


def stage1_name(d, method, variant='x1'):
    return f's1-{d}-{method}-{variant}'


def plan(m):
    """Every run of the matrix: stage-1 runs first (x1 before the variants, whose warm-up is a share of x1's steps),
    then stage 2, seed by seed within each cell group."""
    sweep = m['sweep']
    runs, s2 = [], []
    for d in dict.fromkeys(d for d, _ in m['pairs']):
        for meth in m['methods']:
            variants = sweep['variants'] if meth == sweep['method'] else ['x1']
            for v in ['x1'] + [v for v in variants if v != 'x1']:
                runs.append({'stage': 1, 'dataset': d, 'method': meth, 'variant': v, 'name': stage1_name(d, meth, v)})
    for d, task in m['pairs']:
        for f in m['fractions']:
            for seed in m['seeds']:
                combos = [(meth, init, 'x1') for meth in m['methods'] for init in ('random', 'tpp')]
                combos += [(sweep['method'] if init == 'linear_tpp' else 'ref', init, 'x1' if init == 'linear_tpp'
                            else '') for init in m['references'].get(f, [])]
                if f == sweep['fraction'] and sweep['method'] in m['methods']:
                    combos += [(sweep['method'], 'tpp', v) for v in sweep['variants'] if v != 'x1']
                for meth, init, v in combos:
                    uses = v if init in ('tpp', 'linear_tpp') else ''
                    tag = init if meth == 'ref' else f'{meth}-{init}' + (f'-{v}' if init == 'tpp' and v != 'x1' else '')
                    s2.append({'stage': 2, 'dataset': d, 'task': task, 'fraction': f, 'seed': seed, 'method': meth,
                               'init': init, 'variant': uses, 'name': f'{d}-{SHORT[task]}-{frac_tag(f)}-{tag}-s{seed}'})
    return runs + s2


def tune_plan(m):
    """--tune: random-init PEFT of each method and full fine-tuning at each learning rate of TUNE, one seed."""
    runs = []
    for d, task in m['pairs']:
        for f in m['fractions']:
            for meth, init in [(m['sweep']['method'], 'random'), ('ref', 'full')]:
                for lr in TUNE['peft' if init == 'random' else 'full']:
                    tag = init if meth == 'ref' else f'{meth}-{init}'
                    runs.append({'stage': 2, 'dataset': d, 'task': task, 'fraction': f, 'seed': TUNE['seed'],
                                 'method': meth, 'init': init, 'variant': '', 'lr': lr,
                                 'name': f'tune-{d}-{SHORT[task]}-{frac_tag(f)}-{tag}-lr{lr:g}'})
    return runs


def stage1_sets(run, m, out):
    """Stage-1 settings of a variant: its epochs (a multiple of the data set's 1x) and its decoder policy."""
    mult, decoder = VARIANTS[run['variant']]
    sets = [f"pretrain.epochs={max(1, round(mult * m['stage1'][run['dataset']]))}"]
    if decoder == 'frozen':
        sets.append('pretrain.train_decoder=false')
    if decoder == 'warmup':   # a quarter of x1's steps, read from its targets file (x1 runs first)
        x1 = out / stage1_name(run['dataset'], run['method']) / 'targets.pth'
        steps = torch.load(x1, map_location='cpu', weights_only=False)['meta']['steps']
        sets.append(f'pretrain.decoder_warmup_steps={max(1, round(WARMUP_FRACTION * steps))}')
    return sets


def overrides(run, m, user_sets, out, backbone):
    """--set list of one run: the matrix's settings, then the user's, then what the study itself controls."""
    d = run['dataset']
    sets = list(DATASETS[d])
    if run['method'] in METHODS:
        sets += METHODS[run['method']]
    if run['stage'] == 1:
        sets += stage1_sets(run, m, out)
    else:
        sets += m['stage2'].get((d, run['fraction']), [])
        lr = run.get('lr') or m['lr'].get((d, run['fraction']), {}).get('full' if run['init'] == 'full' else 'peft')
        sets += [f'finetune.lr={lr}'] if lr else []
    sets += user_sets
    sets += [f'run.out_dir={out}', f'backbone.checkpoint={backbone}']
    if run['stage'] == 1:
        sets += [f"pretrain.name={run['name']}", 'run.seed=0']
    else:
        sets += [f"finetune.name={run['name']}", f"finetune.init={run['init']}", f"finetune.task={run['task']}",
                 f"data.label_fraction={run['fraction']}", f"run.seed={run['seed']}", f"data.label_seed={run['seed']}"]
        if run['variant']:
            targets = out / stage1_name(d, run['method'], run['variant']) / 'targets.pth'
            sets += [f'finetune.targets={targets}']
    return sets


def _plain(x):
    return json.loads(json.dumps(x))


def stale_keys(saved, expected, prefix=''):
    """Keys whose values differ between a finished run's config and the one this invocation would use."""
    out = []
    for k in sorted(set(saved) | set(expected)):
        a, b = saved.get(k), expected.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += stale_keys(a, b, f'{prefix}{k}.')
        elif a != b:
            out.append(f'{prefix}{k}: {a!r} (saved) vs {b!r} (now)')
    return out


HEAVY = ('checkpoint.pth', 'best.pth', 'model.pth')   # deleted from finished runs unless --keep


def execute(run, config_path, sets, verbose, keep=False):
    """Run one stage in-process: skip it if finished, resume it if interrupted with a checkpoint, else (re)start."""
    folder = run['dir']
    done = folder / ('targets.pth' if run['stage'] == 1 else 'metrics.json')
    failed = folder / 'failed.json'
    cfg = config.load_config(config_path, sets)
    dcfg = cfg['data']
    if dcfg['intensity'] == 'auto':   # resolved as the stage resolves it: its config.yaml holds the mode used
        dcfg['intensity'] = data.resolve_intensity('auto', *data.read_cases(dcfg, cfg['run']['cache_dir']))[0]
    if done.is_file() or failed.is_file():
        saved = yaml.safe_load((folder / 'config.yaml').read_text())
        if cfg['model']['in_chans'] is None:   # null follows the data: config.yaml holds what the stage resolved
            cfg['model']['in_chans'] = saved['model']['in_chans']
        ignore = 'finetune' if run['stage'] == 1 else 'pretrain'   # what the stage does not read
        diff = stale_keys(*({k: v for k, v in _plain(c).items() if k != ignore} for c in (saved, cfg)))
        if diff:
            raise config.UserError(f'{folder} was run with another config ({"; ".join(diff[:4])}): use another '
                                   f'--out, or delete the folder to re-run it')
        return 'done'
    stage1 = folder.parent / (run.get('stage1')   # the stage-1 run it starts from
                              or stage1_name(run['dataset'], run['method'], run.get('variant') or 'x1'))
    if run.get('variant') and run['stage'] == 2 and (stage1 / 'failed.json').is_file():   # no targets to start from
        folder.mkdir(parents=True, exist_ok=True)
        (folder / 'config.yaml').write_text(yaml.safe_dump(cfg, sort_keys=False))
        failed.write_text(json.dumps({'error': f'stage 1 ({stage1.name}) diverged'}))
        return 'diverged'
    resume = (folder / 'checkpoint.pth').is_file()
    if folder.exists() and not resume:
        shutil.rmtree(folder)                # interrupted before its first checkpoint: start again
    script = pretrain_targets if run['stage'] == 1 else finetune
    start = time.time()
    sink = contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO())
    try:
        with sink:
            script.main(argparse.Namespace(config=str(config_path), set=sets, resume=resume))
        status = 'resumed' if resume else 'ran'
    except engine.NonFiniteLossError as e:   # a diverged run is a result too: recorded, not retried
        failed.write_text(json.dumps({'error': str(e)}))
        status = 'diverged'
    (folder / 'benchmark.json').write_text(json.dumps({'seconds': round(time.time() - start, 1), 'resumed': resume}))
    if not keep:
        for name in HEAVY:
            (folder / name).unlink(missing_ok=True)
    return status


# ----------------------------------------------------------------------------------------------------------------------
# Results

def converge_epoch(scores, fraction=CONVERGED):
    """First epoch (1-based) whose validation score reaches `fraction` of the run's best."""
    finite = [s for s in scores if s is not None and math.isfinite(s)]
    if not finite:
        return None
    best = max(finite)
    for i, s in enumerate(scores):
        if s is not None and math.isfinite(s) and s >= fraction * best:
            return i + 1
    return None


def collect(run):
    """One row of runs.csv for a finished run."""
    folder = run['dir']
    row = {k: run.get(k, '') for k in ('stage', 'dataset', 'task', 'fraction', 'method', 'init', 'variant', 'seed',
                                       'lr', 'name')}
    bench = folder / 'benchmark.json'
    row['seconds'] = json.loads(bench.read_text())['seconds'] if bench.is_file() else float('nan')
    if (folder / 'failed.json').is_file():
        return {**row, 'status': 'diverged'}
    row['status'] = 'ok'
    if run['stage'] == 1:
        meta = torch.load(folder / 'targets.pth', map_location='cpu', weights_only=False)['meta']
        return {**row, 'steps': meta['steps'], 'final_loss': meta['final_loss'],
                'decoder': run['decoder'] if 'decoder' in run else VARIANTS[run['variant']][1]}
    mt = json.loads((folder / 'metrics.json').read_text())
    test, curve = mt['test'], [h.get('score') for h in mt['history']]
    if run['task'] == 'classification':
        metric, aux, floor = 'auc', test['accuracy'], test['majority_floor']
        collapsed = test['accuracy'] <= test['majority_floor'] + 1e-9
    else:
        dice = [v for k, v in test.items() if k.startswith('dice_') and k != 'dice_mean']
        metric, aux, floor = 'dice', min(dice), 0.0
        collapsed = aux < 0.02
    finite = [s for s in curve if s is not None and math.isfinite(s)]
    row.update(metric=metric, test_score=test['score'], test_aux=aux, floor=floor, collapsed=int(collapsed),
               val_score=mt['val']['score'], best_epoch=mt['best_epoch'], epochs=len(curve),
               converge_epoch=converge_epoch(curve), val_auc=float(np.mean(finite)) if finite else float('nan'),
               trainable=mt['params']['trainable'], total=mt['params']['total'], targets=mt['params']['targets'],
               train_seconds=mt['seconds'],
               test_metrics=json.dumps({k: round(v, 4) for k, v in test.items()}),
               val_curve=';'.join(f'{s:.4f}' for s in curve))
    if not math.isfinite(row['seconds']):
        row['seconds'] = mt['seconds']
    return row


CSV_FIELDS = ['stage', 'dataset', 'task', 'fraction', 'method', 'init', 'variant', 'seed', 'lr', 'name', 'status',
              'metric', 'test_score', 'test_aux', 'floor', 'collapsed', 'val_score', 'best_epoch', 'epochs',
              'converge_epoch', 'val_auc', 'trainable', 'total', 'targets', 'steps', 'final_loss', 'decoder',
              'seconds', 'train_seconds', 'test_metrics', 'val_curve']


def write_csv(rows, path, fields=CSV_FIELDS):
    with open(path, 'w', newline='') as f:
        w = csv.DictWriter(f, fields, extrasaction='ignore')
        w.writeheader()
        for r in rows:
            w.writerow({k: (f'{v:.4f}' if isinstance(v, float) and k not in ('fraction', 'lr') else v)
                        for k, v in r.items()})


# ----------------------------------------------------------------------------------------------------------------------
# Statistics and the summary

T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086]   # Student t, 97.5% quantile, 1..20 degrees of freedom


def paired(a, b):
    """TPP − reference paired by seed: mean, 95% t-interval [lo, hi] and wins (TPP higher), over the seeds of both."""
    seeds = sorted(set(a) & set(b))
    d = np.array([a[s] - b[s] for s in seeds])
    if len(d) < 2:
        return {'paired_diff_mean': float(d.mean()) if len(d) else None, 'paired_diff_ci95': None,
                'wins': int((d > 0).sum()), 'paired_n': len(d)}
    half = T975[min(len(d), len(T975) + 1) - 2] * d.std(ddof=1) / math.sqrt(len(d))
    return {'paired_diff_mean': float(d.mean()), 'paired_diff_ci95': [float(d.mean() - half), float(d.mean() + half)],
            'wins': int((d > 0).sum()), 'paired_n': len(d)}


def cells(rows):
    """Stage-2 rows grouped by cell, in matrix order: {(dataset, task, fraction, method, init, variant): [rows]}."""
    out = {}
    for r in rows:
        if r['stage'] == 2:
            out.setdefault((r['dataset'], r['task'], r['fraction'], r['method'], r['init'], r['variant']), []).append(r)
    return out


def summarise(rows, m):
    """summary.json: one cell per (data, task, labels, method, init, stage1_steps, decoder), the primary endpoint
    per task (the stage-1 variant chosen on validation) and the health criteria of the baselines."""
    s1 = {(r['dataset'], r['method'], r['variant']): r for r in rows if r['stage'] == 1 and r['status'] == 'ok'}
    groups, out = cells(rows), []
    for (d, task, f, meth, init, v), rs in groups.items():
        ok = sorted((r for r in rs if r['status'] == 'ok'), key=lambda r: r['seed'])
        steps = s1.get((d, meth, v), {}).get('steps') if v else None
        cell = {'data': d, 'task': task, 'labels': f, 'method': None if meth == 'ref' else meth,
                'init': INIT_NAMES[init], 'stage1_variant': v or None, 'stage1_steps': steps,
                'decoder': VARIANTS[v][1] if v else None, 'metric': ok[0]['metric'] if ok else None,
                'seeds': [r['seed'] for r in ok], 'values': [r['test_score'] for r in ok],
                'val_values': [r['val_score'] for r in ok], 'diverged': len(rs) - len(ok),
                'collapsed': sum(r['collapsed'] for r in ok), 'worst_class': [r['test_aux'] for r in ok],
                'mean': float(np.mean([r['test_score'] for r in ok])) if ok else None,
                'std': float(np.std([r['test_score'] for r in ok], ddof=1)) if len(ok) > 1 else None,
                'converge_epoch_mean': finite_mean([r['converge_epoch'] for r in ok]),
                'val_curve_auc_mean': finite_mean([r['val_auc'] for r in ok]),
                'epochs': ok[0]['epochs'] if ok else None, 'trainable': ok[0]['trainable'] if ok else None}
        ref = {'tpp': (meth, 'random', ''), 'linear_tpp': ('ref', 'linear', '')}.get(init)
        if ref and (d, task, f, *ref) in groups:
            mine = {r['seed']: r['test_score'] for r in ok}
            theirs = {r['seed']: r['test_score'] for r in groups[(d, task, f, *ref)] if r['status'] == 'ok'}
            cell.update(paired(mine, theirs))
            cell['paired_against'] = INIT_NAMES[ref[1]]
        out.append(cell)
    return {'design': design(out, m), 'cells': out}


def finite_mean(values):
    """The mean of the finite values (None and '' left out), or None when there are none."""
    v = [x for x in values if x is not None and x != '' and math.isfinite(x)]
    return float(np.mean(v)) if v else None


def find(cells_, **key):
    return [c for c in cells_ if all(c[k] == v for k, v in key.items())]


def design(cells_, m):
    """The pre-registered design with what it chose and what it checked (results/study/design.md in words)."""
    sweep, primary, health = m['sweep'], {}, []
    for d, task in m['pairs']:
        cand = find(cells_, data=d, task=task, labels=sweep['fraction'], method=sweep['method'], init='tpp')
        cand = [c for c in cand if c['val_values']]
        if cand:
            best = max(cand, key=lambda c: (np.mean(c['val_values']), c['stage1_variant'] == 'x1'))
            primary[f'{d}:{task}'] = {
                'chosen_on_validation': {c['stage1_variant']: round(float(np.mean(c['val_values'])), 4) for c in cand},
                'variant': best['stage1_variant'], 'stage1_steps': best['stage1_steps'], 'decoder': best['decoder'],
                **{k: best.get(k) for k in ('mean', 'paired_diff_mean', 'paired_diff_ci95', 'wins', 'paired_n')}}
        for c in find(cells_, data=d, task=task, init='random'):      # no collapsed random-init PEFT run
            health.append({'criterion': f"random {c['method']} at {c['labels']:.0%} labels: no collapsed run",
                           'data': d, 'value': c['collapsed'], 'holds': c['collapsed'] == 0})
            if task == 'segmentation' and c['labels'] == 1.0:
                worst = min(c['worst_class'], default=float('nan'))
                health.append({'criterion': f"random {c['method']} at 100% labels: every foreground class Dice > "
                               f"{HEALTH['dice']} in every run", 'data': d, 'value': worst,
                               'holds': worst > HEALTH['dice']})
        for lo, fu in zip(find(cells_, data=d, task=task, labels=1.0, method='lora', init='random'),
                          find(cells_, data=d, task=task, labels=1.0, init='full')):
            gap = fu['mean'] - lo['mean']
            health.append({'criterion': f"random LoRA within {HEALTH['reach']} of full fine-tuning at 100% labels",
                           'data': d, 'value': gap, 'holds': gap <= HEALTH['reach']})
    return {'matrix': {k: (v if k != 'stage2' and k != 'lr' else {f'{a}:{b:g}': x for (a, b), x in v.items()})
                       for k, v in m.items()},
            'variants': {k: {'budget': b, 'decoder': p} for k, (b, p) in VARIANTS.items()},
            'primary_endpoint': 'test metric of TPP vs random-init LoRA at the sweep fraction, paired by seed, at the '
                                'stage-1 variant with the best mean validation metric', 'primary': primary,
            'health': health, 'health_holds': all(h['holds'] for h in health), 'machine': machine()}


HEALTH = {'dice': 0.05, 'reach': 0.05}   # design.md: worst foreground Dice at 100% CT; LoRA-to-full gap at 100%


# ----------------------------------------------------------------------------------------------------------------------
# The report: results.md, val_curves.csv and two plots (SVG)

def mean_std(values, digits=3):
    v = [x for x in values if x is not None and math.isfinite(x)]
    if not v:
        return '–'
    if len(v) == 1:
        return f'{v[0]:.{digits}f}'
    return f'{np.mean(v):.{digits}f} ± {np.std(v, ddof=1):.{digits}f}'


def _diff(c):
    if c.get('paired_diff_ci95') is None:
        return '–'
    lo, hi = c['paired_diff_ci95']
    return f"{c['paired_diff_mean']:+.3f} [{lo:+.3f}, {hi:+.3f}] | {c['wins']}/{c['paired_n']}"


def write_markdown(summary, path, header):
    cells_, dsg = summary['cells'], summary['design']
    lines = header + ['', '### Primary endpoint', '',
                      '| data:task | variant (chosen on validation) | stage-1 steps | decoder | TPP LoRA | TPP − random '
                      '[95% CI] | wins |', '|---|---|---|---|---|---|---|']
    for k, p in dsg['primary'].items():
        lines.append(f"| {k} | {p['variant']} ({', '.join(f'{v}: {s:.3f}' for v, s in p['chosen_on_validation'].items())})"
                     f" | {p['stage1_steps']} | {p['decoder']} | {p['mean']:.3f} | {_diff(p)} |")
    lines += ['', '### Every cell', '',
              'Mean ± std of the test metric over seeds (AUC: macro one-vs-rest ROC AUC; Dice: mean foreground Dice '
              'per volume). *worst*: accuracy (classification) or the worst foreground class\'s Dice. *collapsed*: '
              'runs at or below the majority-class accuracy / with a foreground class at Dice < 0.02. *converge*: '
              f'first epoch reaching {CONVERGED:.0%} of the run\'s best validation metric; *val AUC*: mean of the '
              'validation curve (area under it, per epoch). TPP rows: TPP − reference paired by seed, 95% t-interval, '
              'wins.', '',
              '| data | task | labels | method | init | stage 1 | test | worst | collapsed | converge / epochs | '
              'val AUC | TPP − reference [95% CI] | wins |', '|---|---|---|---|---|---|---|---|---|---|---|---|---|']
    for c in cells_:
        s1 = f"{c['stage1_variant']} ({c['stage1_steps']} steps, decoder {c['decoder']})" if c['stage1_variant'] else ''
        conv = '–' if c['converge_epoch_mean'] is None else f"{c['converge_epoch_mean']:.1f}"
        auc = '–' if c['val_curve_auc_mean'] is None else f"{c['val_curve_auc_mean']:.3f}"
        lines.append(f"| {c['data']} | {c['task']} | {c['labels']:.0%} | {c['method'] or '–'} | {c['init']} | {s1} | "
                     f"{mean_std(c['values'])} | {mean_std(c['worst_class'])} | {c['collapsed']}/{len(c['values'])} | "
                     f"{conv} / {c['epochs']} | {auc} | {_diff(c)} |")
    lines += ['', '### Health of the baselines', ''] + health_table(dsg['health'])
    Path(path).write_text('\n'.join(lines) + '\n')


def health_table(health):
    """The baselines' health criteria as a markdown table."""
    return ['| data | criterion | value | holds |', '|---|---|---|---|'] + [
        f"| {h['data']} | {h['criterion']} | {h['value']:.3g} | {'yes' if h['holds'] else 'NO'} |" for h in health]


def write_curves(rows, path):
    """Mean validation metric per epoch over seeds, one row per (cell, epoch)."""
    with open(path, 'w', newline='') as f:
        w = csv.writer(f)
        w.writerow(['dataset', 'task', 'fraction', 'method', 'init', 'variant', 'epoch', 'val_mean', 'n_seeds'])
        for (d, t, frac, m, init, v), cell_runs in cells(rows).items():
            curves = [[float(x) for x in r['val_curve'].split(';')] for r in cell_runs
                      if r['status'] == 'ok' and r.get('val_curve')]
            if curves:
                n = min(map(len, curves))
                for e, val in enumerate(np.nanmean(np.array([c[:n] for c in curves]), 0)):
                    w.writerow([d, t, frac, m, init, v, e + 1, f'{val:.4f}', len(curves)])


def line_plot(path, title, xlabel, ylabel, series, logx=False, zero=False, xticks=None):
    """A line plot (matplotlib, SVG): series = [(name, xs, ys, errors or None)]; the errors are [lo, hi] intervals
    drawn as bars; zero draws the line y = 0; xticks labels the x positions 0, 1, ..."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    plt.rcParams['svg.hashsalt'] = 'tpp'            # the same figure gives the same file
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, xs, ys, errs in series:
        yerr = None if not errs else np.abs(np.array([[e[0], e[1]] for e in errs]).T - np.array(ys))   # (2, N)
        ax.errorbar(xs, ys, yerr=yerr, marker='o', markersize=4, capsize=3, label=name)
    if zero:
        ax.axhline(0, color='grey', linestyle='--', linewidth=1)
    if logx:
        ax.set_xscale('log')
    if xticks:
        ax.set_xticks(range(len(xticks)), xticks)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.legend(fontsize=8, loc='center left', bbox_to_anchor=(1.01, 0.5))
    fig.savefig(path, bbox_inches='tight', metadata={'Date': None})
    plt.close(fig)


def write_plots(summary, rows, out, m):
    """effect_vs_stage1.svg: TPP − random (paired, 95% CI) against stage-1 steps per decoder policy;
    val_curves.svg: mean validation curve of TPP (the primary variant) and random LoRA at the sweep fraction."""
    sweep, effect, curves = m['sweep'], [], []
    for d, task in m['pairs']:
        cand = find(summary['cells'], data=d, task=task, labels=sweep['fraction'], method=sweep['method'], init='tpp')
        for decoder in ('trained', 'frozen', 'warmup'):
            pts = sorted((c['stage1_steps'], c['paired_diff_mean'], c['paired_diff_ci95']) for c in cand
                         if c['decoder'] == decoder and c.get('paired_diff_ci95'))
            if pts:
                effect.append((f'{d} {SHORT[task]}, decoder {decoder}', *map(list, zip(*pts))))
        chosen = summary['design']['primary'].get(f'{d}:{task}', {}).get('variant')
        for init, v in (('random', ''), ('tpp', chosen)):
            runs = [r for r in rows if r['stage'] == 2 and (r['dataset'], r['task'], r['fraction'], r['method'],
                    r['init'], r['variant']) == (d, task, sweep['fraction'], sweep['method'], init, v)
                    and r['status'] == 'ok']
            if runs:
                arr = np.array([[float(x) for x in r['val_curve'].split(';')] for r in runs])
                curves.append((f'{d} {SHORT[task]} {init}' + (f' {v}' if v else ''),
                               list(range(1, arr.shape[1] + 1)), list(np.nanmean(arr, 0)), None))
    if effect:
        line_plot(out / 'effect_vs_stage1.svg', f'TPP − random LoRA, {sweep["fraction"]:.0%} labels (test, 95% CI)',
                 'stage-1 steps (log)', 'TPP − random', effect, logx=True, zero=True)
    if curves:
        line_plot(out / 'val_curves.svg', f'validation metric, LoRA, {sweep["fraction"]:.0%} labels (mean over seeds)',
                 'epoch', 'validation metric', curves)


# ----------------------------------------------------------------------------------------------------------------------

def machine():
    return (f'{speed.cpu_name()} visible, torch {torch.__version__} ({torch.get_num_threads()} threads), '
            f"{'CUDA ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU'}, "
            f'Python {platform.python_version()}')


def run_all(runs, args, m, out, sets_of=None, datasets=DATASETS):
    """Execute the runs in order (skipping finished ones) and return their rows. sets_of(run, m, user_sets, out,
    backbone) gives a run's --set list (default: overrides); datasets maps a run's dataset to its data overrides."""
    sets_of = sets_of or overrides
    backbones = {}
    for i, run in enumerate(runs):
        run['dir'] = out / run['name']
        d = run['dataset']
        if d not in backbones:   # the config's backbone (the embedded default is bootstrapped once and cached)
            cfg = config.load_config(args.config, datasets[d] + list(args.set))
            backbones[d] = pretrain_backbone.resolve(cfg).resolve()
        sets = sets_of(run, m, list(args.set), out, backbones[d])
        t = time.time()
        status = execute(run, args.config, sets, args.verbose, args.keep)
        run['row'] = row = collect(run)
        shown = (f"test {row['metric']} {row['test_score']:.3f} (val {row['val_score']:.3f})"
                 if row.get('test_score') is not None else f"{row['status']}, {row.get('steps', '')} steps")
        print(f'[{i + 1}/{len(runs)}] {run["name"]}: {status}, {shown}, {time.time() - t:.0f} s', flush=True)
    return [r['row'] for r in runs]


def tune(args, m, out):
    """--tune: each baseline's learning rate, chosen on the validation metric of one seed outside the study's."""
    rows = run_all(tune_plan(m), args, m, out)
    write_csv(rows, out / 'tune.csv')
    choice = {}
    for r in rows:
        key = (r['dataset'], r['fraction'])
        kind = 'full' if r['init'] == 'full' else 'peft'
        best = choice.setdefault(key, {}).get(kind)
        if r['status'] == 'ok' and (best is None or r['val_score'] > best[1]):
            choice[key][kind] = (r['lr'], r['val_score'])
    lrs = {k: {kind: lr for kind, (lr, _) in v.items()} for k, v in choice.items()}
    print(f"study --tune: {out / 'tune.csv'}; learning rates chosen on validation: {lrs}", flush=True)
    return lrs


def main(args):
    m = select(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.tune:
        return tune(args, m, out)
    runs = plan(m)
    print(f'study: {len(runs)} runs ({sum(r["stage"] == 1 for r in runs)} stage 1) into {out}', flush=True)
    t0 = time.time()
    rows = run_all(runs, args, m, out)
    elapsed = time.time() - t0
    write_csv(rows, out / 'runs.csv')
    write_curves(rows, out / 'val_curves.csv')
    summary = summarise(rows, m)
    (out / 'summary.json').write_text(json.dumps(summary, indent=1) + '\n')
    write_plots(summary, rows, out, m)
    total = sum(r['seconds'] for r in rows if math.isfinite(r['seconds']))
    command = 'python ' + ' '.join(sys.argv) if sys.argv[0].endswith('study.py') else f'study.main({vars(args)})'
    header = ['## Study results', '',
              f'- command: `{command}`',
              f'- machine: {machine()}',
              f'- runs: {len(rows)} ({sum(r["stage"] == 1 for r in rows)} stage 1); sum of run times '
              f'{total / 60:.1f} min; this invocation {elapsed / 60:.1f} min',
              f'- seeds {m["seeds"]}, label fractions {m["fractions"]}'
              + (f'; --set {list(args.set)}' if args.set else '')]
    write_markdown(summary, out / 'results.md', header)
    print(f"study: {out / 'results.md'} | {out / 'summary.json'} | {out / 'runs.csv'} | tensorboard --logdir {out} | "
          f'{elapsed / 60:.1f} min', flush=True)
    return out


if __name__ == '__main__':
    runs.exit_on_user_error(main, parse_args())
