"""How fast tpp's steps run: median seconds per step, images/s, FLOP/s and its share of a matmul peak measured in the
same run, and peak memory. Prints a Markdown table and the issue's targets; writes JSON.

    python tools/speed.py --config config.yaml                              # the demo model of config.yaml
    python tools/speed.py --preset demo,tiny224,base224 --reference         # + ViT-Tiny/-Base 224/16, + timm/peft rows

Rows. A training step is what engine.train does per batch: forward, backward, gradient clipping (as configured),
fused AdamW over the trainable parameters only, zero_grad. Steps reuse one random batch of the right shapes; the
loader is timed on its own.
  mae_full     backbone bootstrap: MAE, every parameter trains
  tpp_lora     stage 1: MAE, backbone frozen, LoRA targets (and the decoder, pretrain.train_decoder) train
  tpp_adapter  stage 1 with parallel adapters as the targets
  peft_cls     stage 2: LoRA + classification head          peft_seg   stage 2: LoRA + segmentation head
  full_ft      classification, every parameter trains       linear     classification, head only (linear probe)
  infer_plain / infer_lora / infer_merged   classification forward, no grad: plain ViT, LoRA unmerged, LoRA merged
  loader       the stage-2 segmentation training loader alone (run.workers; volumes already decoded, as from epoch 2)
  ref_<row>    --reference: the same step built from timm's ViT and peft's LoRA; the MAE rows are the official MAE
               (tpp's MaskedAutoencoder with timm Blocks in encoder and decoder). Same loss, optimiser and batch.
               Each runs in one process with tpp's own step, in turn, step for step: 'vs ref' is the median of
               the per-round time ratios (tpp / reference), which cancels the drift of a shared machine.
               Their memory column is empty (the process holds both models).

FLOPs are counted from the shapes of the matmuls, convolutions and attention a step actually runs
(torch.utils.flop_counter; a multiply-add is 2 FLOPs; elementwise ops, norms and the optimiser are not counted).
For a ViT of depth d, width D, MLP ratio m on N tokens (L patches of p*p*C pixels) the forward pass per image is
    d * ((8 + 4m) * N * D^2 + 4 * N^2 * D) + 2 * L * p^2 * C * D
and the backward pass costs 2x the forward of layers whose weights train, 1x for frozen layers a gradient has to
cross (to reach targets below them), nothing below the lowest trainable parameter: full fine-tuning ~3x the forward;
stage 1 ~2x the encoder on the visible tokens only (N = 1 + L/4), plus ~3x the (small) decoder on all tokens.
% of peak: FLOP/s over the best square matmul measured in the same run (fp32; TF32 on CUDA, as engine enables it).

Memory. CPU: every row runs in a fresh process, forked from a server that only imported the modules; the number is
its peak resident memory (VmHWM, reset through /proc/self/clear_refs) minus its resident memory before the model was
built: model, gradients, optimiser state, activations, batch and allocator slack. CUDA: torch.cuda.max_memory_allocated.
"""
import argparse
import copy
import importlib
import importlib.metadata
import json
import multiprocessing as mp
import platform
import re
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils import flop_counter

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # the project's modules, from any folder
import config  # noqa: E402
import data  # noqa: E402
import engine  # noqa: E402
import finetune  # noqa: E402
import lora  # noqa: E402
import models  # noqa: E402
import pretrain_targets  # noqa: E402
import runs  # noqa: E402

_224 = ['model.img_size=224', 'model.patch_size=16', 'model.in_chans=3', 'model.depth=null']
PRESETS = {  # name: (config overrides, batch size, timed steps, warm-up steps)
    'demo': ([], 32, 20, 3),
    'tiny224': (['model.preset=vit_tiny'] + _224, 16, 10, 3),
    'base224': (['model.preset=vit_base'] + _224, 16, 3, 1),
    'tiny': (['model.preset=null', 'model.img_size=32', 'model.patch_size=8', 'model.in_chans=1', 'model.embed_dim=32',
              'model.depth=4', 'model.num_heads=2', 'model.mlp_ratio=2.0', 'mae.decoder_embed_dim=16',
              'mae.decoder_depth=1', 'mae.decoder_num_heads=2', 'peft.lora.r=2', 'finetune.seg_channels=[16,8,8]'],
             4, 2, 1),  # --tiny, for the test
}
TRAIN_ROWS = {  # row: (model, what trains)
    'mae_full': ('mae', 'all'), 'tpp_lora': ('mae', 'lora'), 'tpp_adapter': ('mae', 'adapter'),
    'peft_cls': ('classification', 'peft'), 'peft_seg': ('segmentation', 'peft'),
    'full_ft': ('classification', 'all'), 'linear': ('classification', 'head')}
INFER_ROWS = ('infer_plain', 'infer_lora', 'infer_merged')
REFERENCE_ROWS = ('mae_full', 'tpp_lora', 'peft_cls', 'full_ft', 'linear')  # those timm + peft build


def count_cpu_attention_flops():
    """torch's FLOP counter knows the CUDA kernels of scaled_dot_product_attention; the CPU ones do the same matmuls,
    so they are counted with the same formulas (registered when a measurement starts, not at import)."""
    for cpu, cuda in (('_scaled_dot_product_flash_attention_for_cpu', '_scaled_dot_product_flash_attention'),
                      ('_scaled_dot_product_flash_attention_for_cpu_backward',
                       '_scaled_dot_product_flash_attention_backward')):
        flop_counter.flop_registry.setdefault(getattr(torch.ops.aten, cpu),
                                              flop_counter.flop_registry[getattr(torch.ops.aten, cuda)])


# ----------------------------------------------------------------------------------------------------------------------
# The models, built by the project's own builders, and their steps

def targets_cfg(peft, kind):
    """The peft: section with one kind of target only: LoRA, or adapters (parallel unless another kind is set)."""
    if kind == 'lora':
        return {**peft, 'lora': {**peft['lora'], 'r': peft['lora']['r'] or 8},
                'adapter': {**peft['adapter'], 'kind': 'none'}}
    adapter = peft['adapter']['kind'] if peft['adapter']['kind'] != 'none' else 'parallel'
    return {**peft, 'lora': {**peft['lora'], 'r': 0}, 'adapter': {**peft['adapter'], 'kind': adapter}}


def peft_lora(peft, **kw):
    """peft's LoraConfig for the configured LoRA, on the encoder blocks only (the MAE decoder's are decoder_blocks)."""
    from peft import LoraConfig
    layers = '|'.join(map(re.escape, peft['lora']['layers']))
    return LoraConfig(r=peft['lora']['r'] or 8, lora_alpha=peft['lora']['alpha'], lora_dropout=peft['lora']['dropout'],
                      target_modules=rf'blocks\.\d+\..*(?:{layers})', **kw)


def build_mae(cfg, trains, reference):
    """The bootstrap MAE (trains='all') or stage 1's, set up as pretrain_targets.py does."""
    mae = models.build_mae(cfg)
    if reference:
        from timm.models.vision_transformer import Block
        a, d = mae.arch, mae.decoder_arch
        mae.blocks = nn.ModuleList(Block(a['embed_dim'], a['num_heads'], a['mlp_ratio'], qkv_bias=True)
                                   for _ in range(a['depth']))
        mae.decoder_blocks = nn.ModuleList(Block(d['decoder_embed_dim'], d['decoder_num_heads'], a['mlp_ratio'],
                                                 qkv_bias=True) for _ in range(d['decoder_depth']))
    if trains == 'all':  # all but the fixed position embeddings
        lora.mark_trainable(mae, extra=[p for p in mae.parameters() if p.requires_grad])
    elif not reference:
        lora.inject(mae, targets_cfg(cfg['peft'], trains))
        pretrain_targets.freeze_backbone(mae, cfg)
    else:  # peft's LoRA, and the same decoder parameters as pretrain_targets.freeze_backbone
        from peft import inject_adapter_in_model
        decoder = pretrain_targets.trainable_decoder(mae)
        inject_adapter_in_model(peft_lora(cfg['peft']), mae)
        for name, p in mae.named_parameters():
            p.requires_grad = 'lora_' in name
        for p in decoder if cfg['pretrain']['train_decoder'] else ():
            p.requires_grad = True
    return mae


def build_task_model(cfg, task, trains, num_classes, reference):
    """Stage 2 as finetune.build_model: trains 'peft' (LoRA), 'all' (full fine-tuning) or 'head' (linear probe)."""
    if reference:
        from timm.models.vision_transformer import VisionTransformer
        pool = 'token' if cfg['finetune']['pool'] == 'cls' else 'avg'
        model = VisionTransformer(**models.vit_kwargs(cfg['model']), num_classes=num_classes, global_pool=pool)
        if trains == 'peft':
            from peft import get_peft_model
            model = get_peft_model(model, peft_lora(cfg['peft'], modules_to_save=['head']))
        for name, p in model.named_parameters():
            p.requires_grad = p.requires_grad and (trains != 'head' or name.startswith('head.'))
        return model
    cfg = {**cfg, 'finetune': {**cfg['finetune'], 'task': task}}
    backbone = models.build_backbone(cfg)
    if trains == 'peft':
        lora.inject(backbone, cfg['peft'])
    init = {'peft': 'random', 'all': 'full', 'head': 'linear'}[trains]
    return finetune.add_head(cfg, backbone, num_classes, init)[0]


def random_batch(cfg, size, task, num_classes, device):
    arch = models.vit_kwargs(cfg['model'])
    S, C = arch['img_size'], arch['in_chans']
    batch = {'image': torch.randn(size, C, S, S, device=device)}
    if task == 'classification':
        batch['label'] = torch.randint(num_classes, (size,), device=device)
    elif task == 'segmentation':
        batch['mask'] = torch.randint(num_classes, (size, S, S), device=device)
    return batch


def training_step(model, loss_fn, batch, clip, betas, autocast):
    """One step as engine.train runs it (the lr schedule and the loss bookkeeping aside)."""
    model.train()
    optimizer = engine.build_optimizer(model, 1e-4, 0.05, betas)
    params = [p for p in model.parameters() if p.requires_grad]

    def step():
        with autocast():
            loss = loss_fn(model, batch)
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(params, clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step, sum(p.numel() for p in params)


def train_row(spec, device, autocast):
    cfg, (kind, trains) = spec['cfg'], TRAIN_ROWS[spec['row']]
    task = None if kind == 'mae' else kind
    num_classes = spec['num_classes'].get(task)
    batch = random_batch(cfg, spec['batch'], task, num_classes, device)
    if kind == 'mae':
        model = build_mae(cfg, trains, spec['reference']).to(device)
        section = cfg['backbone']['bootstrap'] if trains == 'all' else cfg['pretrain']
        loss_fn = lambda m, b: m(b['image'], section['mask_ratio'])[0]
        return {spec['name']: training_step(model, loss_fn, batch, section['clip_grad'], (0.9, 0.95), autocast)}
    model = build_task_model(cfg, task, trains, num_classes, spec['reference']).to(device)
    if task == 'classification':
        loss_fn = lambda m, b: F.cross_entropy(m(b['image']).float(), b['label'])
    else:
        loss_fn = lambda m, b: finetune.seg_loss(m(b['image']), b['mask'])
    return {spec['name']: training_step(model, loss_fn, batch, cfg['finetune']['clip_grad'], (0.9, 0.999), autocast)}


def infer_rows(spec, device, autocast):
    """The plain ViT, with LoRA unmerged and with LoRA merged (as finetune.py saves it), timed in turn."""
    cfg = spec['cfg']
    plain = build_task_model(cfg, 'classification', 'head', spec['num_classes']['classification'], False)
    unmerged = copy.deepcopy(plain)
    lora.inject(unmerged.backbone, cfg['peft'])
    for _, p in lora.target_parameters(unmerged):
        nn.init.normal_(p, std=0.02)  # trained-looking targets: B nonzero, so LoRA changes the output
    merged = copy.deepcopy(unmerged)
    lora.merge(merged)
    images = random_batch(cfg, spec['batch'], None, None, device)['image']

    def forward(model):
        model.to(device).eval()

        def step():
            with torch.inference_mode(), autocast():
                model(images)
        return step, 0
    return dict(zip(INFER_ROWS, map(forward, (plain, unmerged, merged))))


def loader_row(spec, device, autocast):
    cfg, dcfg = spec['cfg'], spec['cfg']['data']
    cases, info = data.prepare(dcfg, cfg['run']['cache_dir'])
    dcfg = {**dcfg, 'intensity': info['modes']}                    # the config follows the data
    cases = data.split_cases(cases, dcfg)['labelled']
    arch = models.vit_kwargs(cfg['model'])
    dataset = data.SliceDataset(cases, dcfg, arch['img_size'], arch['in_chans'], 'segmentation', train=True)
    for case in cases:  # decoded once and cached: the steady state, from the second epoch on (images already are)
        data.load_mask(case, dataset.load)
    loader = torch.utils.data.DataLoader(dataset, spec['batch'], shuffle=True, drop_last=True,   # as engine.make_loader
                                         num_workers=cfg['run']['workers'], persistent_workers=cfg['run']['workers'] > 0)
    def endless():  # epoch after epoch
        while True:
            yield from loader
    batches = endless()
    return {'loader': (lambda: next(batches), 0)}


def matmul_peak(spec, device):
    """GFLOP/s of the fastest square matmul size, the median of 7 runs (fp32; bf16 too when bf16 rows run)."""
    peaks = {}
    for precision, dtype in [('fp32', torch.float32)] + [('bf16', torch.bfloat16)] * spec['bf16']:
        gflops = []
        for n in spec['matmul_sizes']:
            a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
            times = measure({'mm': (lambda: a @ b, 0)}, {**spec, 'warmup': 2, 'steps': 7}, device, count=False)
            gflops.append(2 * n ** 3 / statistics.median(times['mm']['times']) / 1e9)
        peaks[precision] = max(gflops)
    return peaks


# ----------------------------------------------------------------------------------------------------------------------
# Measuring: every row in a fresh process

def measure(steps, spec, device, count=True):
    """steps: {name: (step, trainable parameters)}. The first warm-up of each step runs under the FLOP counter; after
    the warm-up, rounds of every step in turn are timed until spec['steps'] rounds or spec['seconds'] (>= 3 rounds)."""
    sync = torch.cuda.synchronize if device.type == 'cuda' else lambda: None
    out = {}
    for name, (step, trainable) in steps.items():
        with flop_counter.FlopCounterMode(display=False) if count else nullcontext() as counter:
            step()
        out[name] = {'flops': counter.get_total_flops() if count else None, 'trainable': trainable, 'times': []}
    for _ in range(spec['warmup'] - 1):
        for step, _ in steps.values():
            step()
    sync()
    start = time.perf_counter()
    for i in range(spec['steps']):
        if i >= 3 and time.perf_counter() - start > spec['seconds']:
            break
        for name, (step, _) in steps.items():
            t = time.perf_counter()
            step()
            sync()
            out[name]['times'].append(time.perf_counter() - t)
    return out


def _status_mib(key):
    for line in Path('/proc/self/status').read_text().splitlines():
        if line.startswith(key + ':'):
            return int(line.split()[1]) / 1024
    return float('nan')


def _child(spec, conn):
    """Run one row in this fresh process; send back its results (a list of rows) or the error."""
    try:
        try:
            Path('/proc/self/clear_refs').write_text('5')  # VmHWM := VmRSS
        except OSError:
            pass
        if spec.get('reference'):  # imported before the memory baseline: not the step's memory
            for name in ('timm', 'peft'):
                importlib.import_module(name)
        rss_before = _status_mib('VmRSS')
        count_cpu_attention_flops()
        torch.set_num_threads(spec['threads'])
        torch.manual_seed(0)
        device = runs.pick_device(spec['cfg']['run']['device'], 0)
        if spec['row'] == 'matmul':
            return conn.send(matmul_peak(spec, device))
        amp = spec['precision'] == 'bf16'
        autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16) if amp else nullcontext()
        runner = {'loader': loader_row, 'infer': infer_rows}.get(spec['row'], train_row)
        steps = runner(spec, device, autocast)
        if spec['reference']:  # tpp's step first, then the reference's, round after round
            steps = {**train_row({**spec, 'reference': False, 'name': spec['row']}, device, autocast), **steps}
        results = measure(steps, spec, device, count=spec['row'] != 'loader')
        memory = (torch.cuda.max_memory_allocated() / 2 ** 20 if device.type == 'cuda'
                  else _status_mib('VmHWM') - rss_before)
        if spec['reference']:
            ours = results.pop(spec['row'])['times']
            (name, r), = results.items()
            return conn.send([{'row': name, **r, 'memory_mib': None,
                               'tpp_over_ref': statistics.median(a / b for a, b in zip(ours, r['times']))}])
        conn.send([{'row': name, **r, 'memory_mib': memory} for name, r in results.items()])
    except Exception as e:  # shown in the table; the other rows go on
        conn.send({'error': f'{type(e).__name__}: {e}'})


def run_child(ctx, spec):
    receive, send = ctx.Pipe(duplex=False)
    process = ctx.Process(target=_child, args=(spec, send))
    process.start()
    send.close()
    try:
        result = receive.recv()
    except EOFError:  # killed: out of memory, a crash
        result = None
    process.join()
    return result or {'error': f'the process died (exit code {process.exitcode})'}


# ----------------------------------------------------------------------------------------------------------------------
# One preset, the targets, the table

def bench_preset(ctx, args, name):
    overrides, batch, steps, warmup = PRESETS[name]
    cfg = config.load_config(args.config, overrides + args.set)
    device = runs.pick_device(cfg['run']['device'], 0)
    info = data.prepare(cfg['data'], cfg['run']['cache_dir'])[1]
    bf16 = args.bf16 == 'on' or args.bf16 == 'auto' and bf16_supported(device)
    spec = {'cfg': cfg, 'batch': args.batch or batch, 'steps': args.steps or steps, 'warmup': args.warmup or warmup,
            'seconds': args.seconds, 'threads': args.threads, 'bf16': bf16, 'reference': False,
            'num_classes': {'classification': info['num_classes_cls'], 'segmentation': info['num_classes_seg']},
            'matmul_sizes': (128,) if args.tiny else (1024, 2048)}
    peaks = run_child(ctx, {**spec, 'row': 'matmul'})
    if 'error' in peaks:
        raise SystemExit(f"matmul peak: {peaks['error']}")
    jobs = [(row, 'fp32', False) for row in (*TRAIN_ROWS, 'infer', 'loader')]
    jobs += [(row, 'bf16', False) for row in (*TRAIN_ROWS, 'infer') if bf16]
    jobs += [(row, 'fp32', True) for row in REFERENCE_ROWS if args.reference and not args.missing]
    wanted = args.rows.split(',') if args.rows else None
    rows = []
    for row, precision, reference in jobs:
        if wanted and row not in wanted and not (row == 'infer' and set(wanted) & set(INFER_ROWS)):
            continue
        label, started = ('ref_' if reference else '') + row, time.time()
        result = run_child(ctx, {**spec, 'row': row, 'name': label, 'precision': precision, 'reference': reference})
        for r in result if isinstance(result, list) else [{'row': label, **result}]:
            rows.append(summarise(r, precision, spec['batch'], peaks))
            done = r.get('error') or f"{rows[-1]['s_per_step']:.4f} s/step"
            print(f"{name} {r['row']} {precision}: {done} ({time.time() - started:.0f} s)", file=sys.stderr, flush=True)
    kw = models.vit_kwargs(cfg['model'])
    return {'name': name, 'model': f"ViT D={kw['embed_dim']}, depth {kw['depth']}, {kw['num_heads']} heads, "
                                   f"{kw['img_size']}/{kw['patch_size']}, {kw['in_chans']} channel(s)",
            'config': {k: cfg[k] for k in ('model', 'mae', 'peft')}, 'batch': spec['batch'], 'device': str(device),
            'matmul_peak_gflops': peaks, 'rows': rows, 'targets': check_targets(rows)}


def summarise(r, precision, batch, peaks):
    if 'error' in r:
        return {'row': r['row'], 'precision': precision, 'error': r['error']}
    t = statistics.median(r['times'])
    gflop = r['flops'] / 1e9 if r['flops'] else None
    out = {'row': r['row'], 'precision': precision, 'batch': batch, 's_per_step': t, 'images_per_s': batch / t,
           'gflop_per_step': gflop, 'gflop_per_s': gflop and gflop / t,
           'pct_of_peak': gflop and 100 * gflop / t / peaks[precision], 'memory_mib': r['memory_mib'],
           'trainable_params': r['trainable'], 'step_times': r['times']}
    return {**out, 'tpp_over_ref': r['tpp_over_ref']} if 'tpp_over_ref' in r else out


def check_targets(rows):
    """The issue's targets, on the fp32 rows: measured and reported, never asserted."""
    r = {x['row']: x for x in rows if x['precision'] == 'fp32' and 'error' not in x}
    out = []

    def add(target, measured, met):
        out.append({'target': target, 'measured': measured, 'met': bool(met)})
    for name in REFERENCE_ROWS:
        if 'ref_' + name in r:
            ratio = r['ref_' + name]['tpp_over_ref']
            add(f'{name} step at least as fast as timm + peft', f'{ratio:.2f}x its time', ratio <= 1)
    share = {n: r[n]['pct_of_peak'] for n in TRAIN_ROWS if n in r}
    if share:
        add('training steps at >= 60% of the fp32 matmul peak',
            ', '.join(f'{n} {v:.0f}%' for n, v in share.items()), min(share.values()) >= 60)
    if {'tpp_lora', 'full_ft'} <= r.keys():
        ratio = r['tpp_lora']['s_per_step'] / r['full_ft']['s_per_step']
        add('stage-1 TPP step <= 0.5x the full fine-tune step', f'{ratio:.2f}x', ratio <= 0.5)
    if {'tpp_lora', 'mae_full'} <= r.keys():
        ratio = r['tpp_lora']['memory_mib'] / r['mae_full']['memory_mib']
        add('stage-1 TPP step memory <= 0.8x the full MAE step', f'{ratio:.2f}x', ratio <= 0.8)
    if {'infer_merged', 'infer_plain'} <= r.keys():
        slower = 100 * (r['infer_merged']['s_per_step'] / r['infer_plain']['s_per_step'] - 1)
        add('merged-LoRA inference within 3% of the plain ViT', f'{slower:+.1f}%', slower <= 3)
    if {'loader', 'peft_seg'} <= r.keys():
        ratio = r['loader']['images_per_s'] / r['peft_seg']['images_per_s']
        add('loader >= 5x the images/s of the stage-2 step it feeds (peft_seg)', f'{ratio:.0f}x', ratio >= 5)
    return out


def table(preset):
    f = lambda value, spec: '-' if value is None else format(value, spec)
    peaks = ', '.join(f'{k} {v:.0f}' for k, v in preset['matmul_peak_gflops'].items())
    vs_ref = {(x['row'][4:], x['precision']): x['tpp_over_ref'] for x in preset['rows'] if 'tpp_over_ref' in x}
    lines = [f"### {preset['name']}: {preset['model']}; batch {preset['batch']}; matmul peak GFLOP/s {peaks}", '',
             '| row | precision | s/step | images/s | GFLOP/step | GFLOP/s | % of peak | memory MiB | vs ref |',
             '|---|---|---:|---:|---:|---:|---:|---:|---:|']
    for x in preset['rows']:
        if 'error' in x:
            lines.append(f"| {x['row']} | {x['precision']} | error: {x['error']} | | | | | | |")
            continue
        lines.append(f"| {x['row']} | {x['precision']} | {x['s_per_step']:.4f} | {x['images_per_s']:.1f} | "
                     f"{f(x['gflop_per_step'], '.2f')} | {f(x['gflop_per_s'], '.1f')} | {f(x['pct_of_peak'], '.0f')} | "
                     f"{f(x['memory_mib'], '.0f')} | {f(vs_ref.get((x['row'], x['precision'])), '.2f')} |")
    lines += ['', f"Targets ({preset['name']}, fp32; measured, not asserted):", '']
    lines += [f"- {'met' if t['met'] else '**not met**'}: {t['target']} ({t['measured']})" for t in preset['targets']]
    return '\n'.join(lines) + '\n'


# ----------------------------------------------------------------------------------------------------------------------

def bf16_supported(device):
    if device.type == 'cuda':
        return torch.cuda.is_bf16_supported()
    cpuinfo = Path('/proc/cpuinfo')
    return bool(cpuinfo.exists() and re.search(r'\b(avx512_bf16|amx_bf16)\b', cpuinfo.read_text()))


def versions():
    found = {}
    for name in ('timm', 'peft'):
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


def cpu_name():
    cpuinfo = Path('/proc/cpuinfo').read_text() if Path('/proc/cpuinfo').exists() else ''
    found = re.search(r'model name\s*:\s*(.*)', cpuinfo)
    return f"{found.group(1) if found else platform.processor()}, {mp.cpu_count()} cores"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--config', default='config.yaml', help='the project config (run:, model:, mae:, peft:, ...)')
    p.add_argument('--set', action='append', default=[], metavar='KEY=VALUE', help='config override')
    p.add_argument('--preset', default='demo', help=f"comma-separated, of {', '.join(PRESETS)} (default demo)")
    p.add_argument('--rows', help='comma-separated subset of the rows (default: all)')
    p.add_argument('--steps', type=int, help='timed steps per row (default: demo 20, tiny224 10, base224 3)')
    p.add_argument('--warmup', type=int, help='untimed steps first, the first one counts the FLOPs (default 3; '
                                              'base224 1)')
    p.add_argument('--seconds', type=float, default=60.0, help='stop timing a row after this long (>= 3 steps)')
    p.add_argument('--batch', type=int, help='batch size (default: demo 32, tiny224 and base224 16)')
    p.add_argument('--threads', type=int, help=f'torch threads (default {torch.get_num_threads()}; --tiny 1)')
    p.add_argument('--bf16', choices=('auto', 'on', 'off'), default='auto',
                   help='bf16 autocast rows too; auto: where the device has native bf16 (CUDA, AVX512-BF16, AMX)')
    p.add_argument('--reference', action='store_true', help='time the same steps built from timm + peft too')
    p.add_argument('--tiny', action='store_true', help='a tiny model, 2 steps, every row: checks that all runs')
    p.add_argument('--out', default='runs/speed.json', help='JSON results (default runs/speed.json)')
    args = p.parse_args(argv)
    if args.tiny:
        args.preset, args.threads = 'tiny', args.threads or 1
    args.threads = args.threads or torch.get_num_threads()
    for name in args.preset.split(','):
        if name not in PRESETS:
            p.error(f"--preset {name}: not one of {', '.join(PRESETS)}")
    return args


def main(argv=None):
    args = parse_args(argv)
    found = versions()
    args.missing = [name for name, version in found.items() if version is None]
    # Rows run in processes forked from a server that has imported these (fast to start, nothing computed yet).
    # timm and peft are imported by the reference rows themselves: imported in the server, timm leaves the forked
    # processes' OpenMP pool at one thread.
    ctx = mp.get_context('forkserver' if 'forkserver' in mp.get_all_start_methods() else 'spawn')
    ctx.set_forkserver_preload(['__main__' if __name__ == '__main__' else __name__, 'torch', 'data', 'engine', 'runs',
                                'lora', 'models', 'finetune', 'pretrain_targets', 'pretrain_backbone', 'checkpoints',
                                'synthetic'])
    report = {'machine': {'cpu': cpu_name(), 'python': platform.python_version(), 'torch': torch.__version__,
                          'cuda': torch.cuda.get_device_name() if torch.cuda.is_available() else None,
                          'threads': args.threads, **found},
              'args': {k: v for k, v in vars(args).items() if k != 'missing'}, 'presets': []}
    if args.reference and args.missing:
        report['reference'] = f"not run: {' and '.join(args.missing)} not installed (pip install timm peft)"
    report['presets'] = [bench_preset(ctx, args, name) for name in args.preset.split(',')]
    m = report['machine']
    print(f"## tpp bench: {m['cuda'] or m['cpu']}, {args.threads} threads, torch {m['torch']}"
          + (f", timm {m['timm']}, peft {m['peft']}" if args.reference and not args.missing else '') + '\n')
    if 'reference' in report:
        print(f"Reference rows {report['reference']}.\n")
    for preset in report['presets']:
        print(table(preset))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(f'results: {args.out}')
    return report


if __name__ == '__main__':
    runs.exit_on_user_error(main)
