"""Benchmark: TPP against plain PEFT (random init), with full fine-tuning and linear probing as references.

    python tools/study.py --config config.yaml [--quick] [--out runs/study] [--set key=value ...]

Runs a matrix of cells (data set x task x label fraction x method x init, each with several seeds) in-process by
calling pretrain_targets.main and finetune.main, one run folder per run under --out, and writes there:

    results.md    mean +- std of the test metric per cell, the floor a collapsed run sits at (majority class /
                  all background), trainable parameters, epochs to converge, wall time; TPP - random per seed
    runs.csv      every run (stage 1 and stage 2), with its validation curve
    val_curves.csv  validation metric per epoch, TPP vs random init (and the references), mean over seeds;
                  every run's TensorBoard events hold its curve: tensorboard --logdir <out>

Every stage-1 run (one per data set and PEFT method) is shared by all the stage-2 runs that use it: the targets are
pre-trained once, on all the training images (labels unused), whatever the label fraction or seed. Every run uses
the same backbone: the config's (the embedded default is bootstrapped once and cached, then pinned for every run).

Resuming: run it again with the same arguments. Finished runs (metrics.json / targets.pth) are skipped, an
interrupted run folder with a checkpoint is resumed exactly, one without a checkpoint is restarted. A finished run
whose saved config differs from what this invocation would use is an error (use another --out or delete it).
A finished run keeps its metrics, log, config and TensorBoard events (and stage 1 its targets); its checkpoints and
model files (tens of MB each) are deleted unless --keep.

Your own data: --datasets config uses the data section of --config / --set as it is (e.g. --set data.layout=msd
--set data.root=...). --set overrides apply to every run and win over the matrix's settings below.
"""
import argparse
import contextlib
import csv
import io
import json
import math
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # the project's modules, from any folder
import data  # noqa: E402
import engine  # noqa: E402
import finetune  # noqa: E402
import pretrain_backbone  # noqa: E402
import pretrain_targets  # noqa: E402

# ----------------------------------------------------------------------------------------------------------------------
# The matrix. Only benchmark settings live here; everything else comes from --config (and --set, which wins).
# Keep model / mae / backbone keys out of it: every run must share one backbone.

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
REFERENCES = ['full', 'linear']  # finetune.init values run once per cell, whatever the PEFT method

PAIRS = [('ct', 'classification'), ('ct', 'segmentation'), ('us', 'classification'), ('us', 'segmentation')]

MATRIX = {
    # About 30 min on 2 CPU cores at the config's default sizes (results/study/README.md). That budget holds two of the four
    # (data set, task) pairs: --pairs all runs all four (about twice as long).
    'default': {
        'pairs': [('ct', 'segmentation'), ('us', 'classification')],
        'fractions': [0.1, 1.0],
        'seeds': [0, 1, 2],
        'methods': ['lora', 'adapter'],
        'inits': ['random', 'tpp'],
        'references': REFERENCES,
        # stage 1, per data set: CT keeps the config's epochs (10: 160 steps); US has only 180 training images
        'stage1': {'ct': [], 'us': ['pretrain.epochs=60'], 'config': []},
        # stage 2, per (data set, label fraction): fewer labels get more epochs (so more than a handful of steps).
        # CT: 38 training volumes (1064 slices; 10%: 4 volumes), US: 180 images (10%: 18). US runs are cheap, and
        # 5 epochs (25 steps) left LoRA and adapters at a single predicted class: they get 20 (100%) and 60 (10%).
        'stage2': {('ct', 1.0): ['finetune.epochs=2'],
                   ('ct', 0.1): ['finetune.epochs=8'],
                   ('us', 1.0): ['finetune.epochs=20'],
                   ('us', 0.1): ['finetune.epochs=60', 'finetune.batch_size=16'],
                   ('config', 1.0): [], ('config', 0.1): []},
    },
    'quick': {                   # smoke test: every code path, few runs; sizes still come from the config
        'pairs': [('ct', 'classification'), ('ct', 'segmentation')],
        'fractions': [0.1],
        'seeds': [0, 1],
        'methods': ['lora', 'adapter'],
        'inits': ['random', 'tpp'],
        'references': REFERENCES,
        'stage1': {d: ['pretrain.epochs=1'] for d in DATASETS},
        'stage2': {(d, f): ['finetune.epochs=2', 'finetune.batch_size=16'] for d in DATASETS for f in (0.1, 1.0)},
    },
}
CONVERGED = 0.95                 # convergence: first epoch whose validation metric reaches 95% of the run's best
SHORT = {'classification': 'cls', 'segmentation': 'seg'}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--config', default='config.yaml', help='YAML config (keys documented in config.yaml)')
    p.add_argument('--set', action='append', default=[], metavar='KEY=VALUE',
                   help='override for every run (wins over the matrix), e.g. run.device=cuda')
    p.add_argument('--out', default='runs/study', help='folder of the run folders and the results')
    p.add_argument('--quick', action='store_true', help='the small smoke-test matrix')
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
            raise SystemExit(f"--methods: {args.methods} is not a list of {', '.join(METHODS)}")
    for pair in m['pairs']:
        if len(pair) != 2 or pair[0] not in DATASETS or pair[1] not in SHORT:
            raise SystemExit(f"--pairs: '{':'.join(pair)}' is not data:task with data one of {', '.join(DATASETS)} "
                             f"and task classification or segmentation")
    return m


# ----------------------------------------------------------------------------------------------------------------------
# Runs

def frac_tag(f):
    return f'l{100 * f:g}'


def plan(m):
    """Every run of the matrix: stage-1 runs first (one per data set and method), then stage 2."""
    runs = []
    for d in dict.fromkeys(d for d, _ in m['pairs']):
        if 'tpp' in m['inits']:
            for meth in m['methods']:
                runs.append({'stage': 1, 'dataset': d, 'method': meth, 'name': f's1-{d}-{meth}'})
    for d, task in m['pairs']:
        for f in m['fractions']:
            for seed in m['seeds']:
                combos = [(meth, init) for meth in m['methods'] for init in m['inits']]
                combos += [('ref', init) for init in m['references']]
                for meth, init in combos:
                    label = init if meth == 'ref' else f'{meth}-{init}'
                    runs.append({'stage': 2, 'dataset': d, 'task': task, 'fraction': f, 'seed': seed,
                                 'method': meth, 'init': init,
                                 'name': f'{d}-{SHORT[task]}-{frac_tag(f)}-{label}-s{seed}'})
    return runs


def overrides(run, m, user_sets, out, backbone):
    """--set list of one run: the matrix's settings, then the user's, then what the benchmark itself controls."""
    d = run['dataset']
    sets = list(DATASETS[d])
    if run['method'] in METHODS:
        sets += METHODS[run['method']]
    if run['stage'] == 1:
        sets += m['stage1'].get(d, [])
    else:
        sets += m['stage2'].get((d, run['fraction']), [])
    sets += user_sets
    sets += [f'run.out_dir={out}', f'backbone.checkpoint={backbone}']
    if run['stage'] == 1:
        sets += [f"pretrain.name={run['name']}", 'run.seed=0']
    else:
        sets += [f"finetune.name={run['name']}", f"finetune.init={run['init']}", f"finetune.task={run['task']}",
                 f"data.label_fraction={run['fraction']}", f"run.seed={run['seed']}"]
        if run['init'] == 'tpp':
            targets = out / f"s1-{d}-{run['method']}" / 'targets.pth'
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


def execute(run, config, sets, verbose, keep=False):
    """Run one stage in-process: skip it if finished, resume it if interrupted with a checkpoint, else (re)start."""
    folder = run['dir']
    done = folder / ('targets.pth' if run['stage'] == 1 else 'metrics.json')
    failed = folder / 'failed.json'
    cfg = engine.load_config(config, sets)
    dcfg = cfg['data']
    if dcfg['intensity'] == 'auto':   # resolved as the stage resolves it: its config.yaml holds the mode used
        dcfg['intensity'] = data.resolve_intensity('auto', *data.read_cases(dcfg, cfg['run']['cache_dir']))[0]
    if done.is_file() or failed.is_file():
        saved = yaml.safe_load((folder / 'config.yaml').read_text())
        ignore = 'finetune' if run['stage'] == 1 else 'pretrain'   # what the stage does not read
        diff = stale_keys(*({k: v for k, v in _plain(c).items() if k != ignore} for c in (saved, cfg)))
        if diff:
            raise SystemExit(f'{folder} was run with another config ({"; ".join(diff[:4])}): use another --out, '
                             f'or delete the folder to re-run it')
        return 'done'
    stage1 = folder.parent / f"s1-{run['dataset']}-{run['method']}"
    if run.get('init') == 'tpp' and (stage1 / 'failed.json').is_file():   # no targets to start from
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
            script.main(argparse.Namespace(config=str(config), set=sets, resume=resume))
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
    row = {k: run.get(k, '') for k in ('stage', 'dataset', 'task', 'fraction', 'method', 'init', 'seed', 'name')}
    bench = folder / 'benchmark.json'
    row['seconds'] = json.loads(bench.read_text())['seconds'] if bench.is_file() else float('nan')
    if (folder / 'failed.json').is_file():
        return {**row, 'status': 'diverged'}
    row['status'] = 'ok'
    if run['stage'] == 1:
        meta = torch.load(folder / 'targets.pth', map_location='cpu', weights_only=False)['meta']
        return {**row, 'steps': meta['steps']}
    mt = json.loads((folder / 'metrics.json').read_text())
    test, curve = mt['test'], [h.get('score') for h in mt['history']]
    if run['task'] == 'classification':
        metric, aux, floor = 'auc', test['accuracy'], test['majority_floor']
        collapsed = test['accuracy'] <= test['majority_floor'] + 1e-9
    else:
        dice = [v for k, v in test.items() if k.startswith('dice_') and k != 'dice_mean']
        metric, aux, floor = 'dice', min(dice), 0.0
        collapsed = aux < 0.02
    row.update(metric=metric, test_score=test['score'], test_aux=aux, floor=floor, collapsed=int(collapsed),
               val_score=mt['val']['score'], best_epoch=mt['best_epoch'], epochs=len(curve),
               converge_epoch=converge_epoch(curve), trainable=mt['params']['trainable'],
               total=mt['params']['total'], targets=mt['params']['targets'],
               train_seconds=mt['seconds'],
               test_metrics=json.dumps({k: round(v, 4) for k, v in test.items()}),
               val_curve=';'.join(f'{s:.4f}' for s in curve))
    if not math.isfinite(row['seconds']):
        row['seconds'] = mt['seconds']
    return row


CSV_FIELDS = ['stage', 'dataset', 'task', 'fraction', 'method', 'init', 'seed', 'name', 'status', 'metric',
              'test_score', 'test_aux', 'floor', 'collapsed', 'val_score', 'best_epoch', 'epochs', 'converge_epoch',
              'trainable', 'total', 'targets', 'steps', 'seconds', 'train_seconds', 'test_metrics', 'val_curve']


def write_csv(rows, path):
    with open(path, 'w', newline='') as f:
        w = csv.DictWriter(f, CSV_FIELDS, extrasaction='ignore')
        w.writeheader()
        for r in rows:
            w.writerow({k: (f'{v:.4f}' if isinstance(v, float) and k not in ('fraction',) else v)
                        for k, v in r.items()})


def mean_std(values, digits=3):
    v = [x for x in values if x is not None and math.isfinite(x)]
    if not v:
        return '–'
    if len(v) == 1:
        return f'{v[0]:.{digits}f}'
    return f'{np.mean(v):.{digits}f} ± {np.std(v, ddof=1):.{digits}f}'


def label(method, init):
    return {'full': 'full fine-tuning', 'linear': 'linear probe'}.get(init, f'{method} {init}')


def cells(rows):
    """Stage-2 rows grouped by cell, in matrix order: {(dataset, task, fraction, method, init): [rows]}."""
    out = {}
    for r in rows:
        if r['stage'] == 2:
            out.setdefault((r['dataset'], r['task'], r['fraction'], r['method'], r['init']), []).append(r)
    return out


def write_markdown(rows, path, header):
    lines = header + ['', '### Test metric per cell', '',
                      'Mean ± std over seeds. Metric: macro one-vs-rest ROC AUC per case (classification; chance '
                      '0.5) or mean foreground Dice per volume (segmentation). *aux*: accuracy (classification) or '
                      'the worst foreground class\'s Dice (segmentation). *floor*: what a collapsed run scores: '
                      'the majority-class accuracy of the test set (classification) or Dice 0 of an all-background '
                      'prediction. *collapsed*: runs with accuracy at or below the majority floor / a foreground '
                      f'class at Dice < 0.02. *converge*: first epoch reaching {CONVERGED:.0%} of the run\'s best '
                      'validation metric. *s/run*: wall time of one stage-2 run.', '',
                      '| data | task | labels | method | metric | test (mean ± std) | aux | floor | collapsed | '
                      'trainable params | converge (epoch) | s/run |',
                      '|---|---|---|---|---|---|---|---|---|---|---|---|']
    for (d, task, f, meth, init), rs in cells(rows).items():
        ok = [r for r in rs if r['status'] == 'ok']
        n_bad = len(rs) - len(ok)
        if not ok:
            lines.append(f'| {d} | {task} | {f:.0%} | {label(meth, init)} | – | diverged ({n_bad}) '
                         f'| | | | | | |')
            continue
        floor = (f"acc {np.mean([r['floor'] for r in ok]):.3f}" if task == 'classification' else 'Dice 0')
        conv = mean_std([r['converge_epoch'] for r in ok], 1)
        div = f' (+{n_bad} diverged)' if n_bad else ''
        lines.append(f"| {d} | {task} | {f:.0%} | {label(meth, init)} | {ok[0]['metric']} | "
                     f"{mean_std([r['test_score'] for r in ok])}{div} | {mean_std([r['test_aux'] for r in ok])} | "
                     f"{floor} | {sum(r['collapsed'] for r in ok)}/{len(ok)} | {ok[0]['trainable']:,} | {conv} "
                     f"/ {ok[0]['epochs']} | {np.mean([r['seconds'] for r in ok]):.0f} |")
    lines += ['', '### TPP − random init (same PEFT method, paired by seed)', '',
              '| data | task | labels | method | random | TPP | TPP − random | TPP better (seeds) | '
              'converge random → TPP (epoch) |', '|---|---|---|---|---|---|---|---|---|']
    groups = cells(rows)
    for (d, task, f, meth, init), rs in groups.items():
        if init != 'tpp' or (d, task, f, meth, 'random') not in groups:
            continue
        tpp = {r['seed']: r for r in rs if r['status'] == 'ok'}
        rnd = {r['seed']: r for r in groups[(d, task, f, meth, 'random')] if r['status'] == 'ok'}
        seeds = sorted(set(tpp) & set(rnd))
        diff = [tpp[s]['test_score'] - rnd[s]['test_score'] for s in seeds]
        better = sum(x > 0 for x in diff)
        conv = (f"{mean_std([rnd[s]['converge_epoch'] for s in seeds], 1)} → "
                f"{mean_std([tpp[s]['converge_epoch'] for s in seeds], 1)}")
        lines.append(f"| {d} | {task} | {f:.0%} | {meth} | {mean_std([rnd[s]['test_score'] for s in seeds])} | "
                     f"{mean_std([tpp[s]['test_score'] for s in seeds])} | {mean_std(diff)} | "
                     f"{better}/{len(seeds)} | {conv} |")
    s1 = [r for r in rows if r['stage'] == 1]
    if s1:
        lines += ['', '### Stage 1 (shared by every TPP run of its data set and method)', '',
                  '| run | steps | s |', '|---|---|---|']
        lines += [f"| {r['name']} | {r.get('steps', '–')} | {r['seconds']:.0f} |" for r in s1]
    Path(path).write_text('\n'.join(lines) + '\n')


# ----------------------------------------------------------------------------------------------------------------------
# Validation curves: a CSV to plot with any tool; every run's TensorBoard events hold them too

def write_curves(rows, path):
    """Mean validation metric per epoch over seeds, one row per (data set, task, labels, method, init, epoch)."""
    with open(path, 'w', newline='') as f:
        w = csv.writer(f)
        w.writerow(['dataset', 'task', 'fraction', 'method', 'init', 'epoch', 'val_mean', 'n_seeds'])
        for (d, t, frac, m, init), runs in cells(rows).items():
            curves = [[float(v) for v in r['val_curve'].split(';')] for r in runs
                      if r['status'] == 'ok' and r.get('val_curve')]
            if curves:
                n = min(map(len, curves))
                for e, v in enumerate(np.nanmean(np.array([c[:n] for c in curves]), 0)):
                    w.writerow([d, t, frac, m, init, e + 1, f'{v:.4f}', len(curves)])


# ----------------------------------------------------------------------------------------------------------------------

def machine():
    return (f'{platform.machine()} {platform.processor() or platform.system()}, {os.cpu_count()} CPU cores visible, '
            f'torch {torch.__version__} ({torch.get_num_threads()} threads), '
            f"{'CUDA ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU'}, "
            f'Python {platform.python_version()}')


def main(args):
    m = select(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = plan(m)
    print(f'study: {len(runs)} runs ({sum(r["stage"] == 1 for r in runs)} stage 1) into {out}', flush=True)
    t0 = time.time()
    backbones = {}
    for i, run in enumerate(runs):
        run['dir'] = out / run['name']
        d = run['dataset']
        if d not in backbones:   # the config's backbone (the embedded default is bootstrapped once and cached)
            cfg = engine.load_config(args.config, DATASETS[d] + list(args.set))
            backbones[d] = pretrain_backbone.resolve(cfg).resolve()
        sets = overrides(run, m, list(args.set), out, backbones[d])
        t = time.time()
        status = execute(run, args.config, sets, args.verbose, args.keep)
        row = collect(run)
        run['row'] = row
        shown = (f"test {row['metric']} {row['test_score']:.3f}" if row.get('test_score') is not None
                 else row['status'])
        print(f'[{i + 1}/{len(runs)}] {run["name"]}: {status}, {shown}, {time.time() - t:.0f} s', flush=True)
    elapsed = time.time() - t0
    rows = [r['row'] for r in runs]
    write_csv(rows, out / 'runs.csv')
    write_curves(rows, out / 'val_curves.csv')
    total = sum(r['seconds'] for r in rows if math.isfinite(r['seconds']))
    command = 'python ' + ' '.join(sys.argv) if sys.argv[0].endswith('study.py') else f'study.main({vars(args)})'
    header = ['## Study results', '',
              f'- command: `{command}`',
              f'- machine: {machine()}',
              f'- runs: {len(rows)} ({sum(r["stage"] == 1 for r in rows)} stage 1); sum of run times '
              f'{total / 60:.1f} min; this invocation {elapsed / 60:.1f} min',
              f'- seeds {m["seeds"]}, label fractions {m["fractions"]}; matrix settings: stage 1 {m["stage1"]}; '
              f'stage 2 {({f"{d} {f:g}": v for (d, f), v in m["stage2"].items() if d in dict(m["pairs"])})}'
              + (f'; --set {list(args.set)}' if args.set else '')]
    write_markdown(rows, out / 'results.md', header)
    print(f"study: {out / 'results.md'} | {out / 'runs.csv'} | {out / 'val_curves.csv'} | tensorboard --logdir {out} | "
          f'{elapsed / 60:.1f} min', flush=True)
    return out


if __name__ == '__main__':
    main(parse_args())
