"""Stage 2 of TPP: PEFT fine-tuning from the pre-trained targets.

    python finetune.py --config config.yaml [--set finetune.init=random] [--resume]

finetune.init:
  tpp     the same backbone and PEFT modules as stage 1, the targets loaded from its targets.pth (TPP)
  random  the same PEFT modules from their usual initialisation (plain PEFT, the baseline TPP improves on)
  full    every backbone parameter fine-tuned but the fixed sin-cos pos_embed (reference)
  linear  frozen backbone, only the task head trained (reference)
  linear_tpp  frozen backbone and frozen pre-trained targets, only the task head trained: does the representation
          carry anything useful before any target is fine-tuned? (the TPP diagnostic)
The task head (classification or segmentation) always trains. Validation picks the best epoch; the test split is
evaluated once, with it (segmentation Dice on each case's own grid, validation's at model resolution). Results:
<run folder>/metrics.json, TensorBoard, best.pth and the inference model model.pth.
"""
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import checkpoints
import config
import data
import engine
import lora
import models
import predictions
import pretrain_backbone
import runs


def seg_loss(logits, mask):
    """Cross-entropy plus soft Dice over the foreground classes: Dice keeps small lesions from being ignored."""
    probs = logits.float().softmax(1)[:, 1:]                                      # (B, K-1, H, W)
    onehot = F.one_hot(mask, logits.shape[1]).permute(0, 3, 1, 2)[:, 1:].float()
    inter, union = (probs * onehot).sum((0, 2, 3)), (probs + onehot).sum((0, 2, 3))
    return F.cross_entropy(logits.float(), mask) + (1 - (2 * inter + 1) / (union + 1)).mean()


def task_loss(task):
    """loss_fn(model, batch) of engine.train for the task."""
    if task == 'classification':
        return lambda net, batch: F.cross_entropy(net(batch['image']).float(), batch['label'])
    return lambda net, batch: seg_loss(net(batch['image']), batch['mask'])


# ----------------------------------------------------------------------------------------------------------------------
# The model: backbone, targets (pre-trained for TPP), task head

def build_model(cfg, run, backbone_path, num_classes, init, source):
    """Backbone (+ targets) + task head, with exactly the parameters of this init method trainable. source: the data
    fine-tuned on (data.describe of the training split), compared with the data the targets were pre-trained on.
    Returns (model, parameter counts, the stage-1 targets loaded or None)."""
    backbone = models.build_backbone(cfg)
    run.log(checkpoints.load_checkpoint(backbone, backbone_path))
    fingerprint = lora.backbone_fingerprint(backbone)
    stage1 = None
    if init in config.TARGET_INITS:
        lora.inject(backbone, cfg['peft'])                         # the same target modules as stage 1
    if init in config.PRETRAINED_INITS:                            # --- TPP: start from the pre-trained targets
        path = targets_path(cfg)
        expected = {'arch': backbone.arch, 'peft': lora.structure(backbone), 'backbone': fingerprint}
        meta, stage1 = lora.load_targets(path, backbone, expected)
        run.log(f"targets: loaded {path} (pre-trained for {meta['steps']} steps, pretext {meta['pretext']})")
        pretrained_on = meta.get('data')                         # None in a targets file that does not record it
        if pretrained_on and pretrained_on != source:           # legitimate (other data), but worth knowing
            named = lambda d: f"{d['layout']} {d['root']} ({d['fingerprint']})"
            run.log(f'warning: targets were pre-trained on {named(pretrained_on)}, fine-tuning on {named(source)}')
    model, counts = add_head(cfg, backbone, num_classes, init)
    model.to(run.device)
    run.log(f"parameters ({init}): total {counts['total']:,} | trainable {counts['trainable']:,} "
            f"({100 * counts['trainable'] / counts['total']:.2f}%) | targets {counts['targets']:,}")
    return model, counts, stage1


def targets_path(cfg):
    """finetune.targets, or stage 1's file: <run.out_dir>/<pretrain.name>/targets.pth."""
    return cfg['finetune']['targets'] or f"{cfg['run']['out_dir']}/{cfg['pretrain']['name']}/targets.pth"


def add_head(cfg, backbone, num_classes, init):
    """TaskModel of the backbone (targets already inserted) and the task head, with exactly the parameters of this
    init method trainable: the targets and the head, everything ('full') or the head alone ('linear', 'linear_tpp')."""
    model = models.TaskModel(backbone, models.build_head(cfg, num_classes, backbone.arch))
    extra = model.head.parameters()
    if init == 'full':   # every parameter the forward uses (DDP needs that): segmentation skips the final norm
        extra = [p for n, p in model.named_parameters() if n != 'backbone.pos_embed'       # fixed sin-cos, as in MAE
                 and not (cfg['finetune']['task'] == 'segmentation' and n.startswith('backbone.norm.'))]
    return model, lora.mark_trainable(model, extra=list(extra), targets=init != 'linear_tpp')


def lora_diagnostics(model, init, stage1=None):
    """For LoRA runs (init random or tpp): update_ratio, the size of the final update next to the weight it adapts;
    for tpp also target_survival, how much of the stage-1 update (stage1: the targets build_model loaded) the final
    one keeps (lora.update_survival)."""
    if init not in ('tpp', 'random') or not any(isinstance(m, lora.LoRALinear) for m in model.modules()):
        return {}
    out = {'update_ratio': lora.update_ratio(model.backbone)}
    if init == 'tpp':
        out['target_survival'] = lora.update_survival(stage1, model.backbone)
    return out


def save_inference_model(run, model, cfg, num_classes):
    """model.pth: the fine-tuned model for inference. With finetune.merge_lora the LoRA updates are folded into the
    backbone weights and the LoRA factors dropped, so it loads into a plain ViT (adapters, if any, stay)."""
    merged = cfg['finetune']['merge_lora'] and any(isinstance(m, lora.LoRALinear) for m in model.modules())
    sd = lora.merged_state_dict(model) if merged else model.state_dict()
    runs.atomic_save({'model': sd, 'arch': model.backbone.arch, 'task': cfg['finetune']['task'],
                      'num_classes': num_classes, 'lora_merged': merged, 'config': cfg}, run.dir / 'model.pth')


# ----------------------------------------------------------------------------------------------------------------------
# The data: the main set split by case, and the external test set

def read_data(cfg):
    """The data of the run, every case checked (data.prepare) before anything is written: {'info', 'splits',
    'num_classes', 'sets': SliceDatasets of labelled / val / test (and external: every case of data.external_*)}."""
    dcfg, task = cfg['data'], cfg['finetune']['task']
    ext_dcfg = data.external_config(dcfg)                          # before dcfg gets the main data's intensity mode
    cases, info = data.prepare(dcfg, cfg['run']['cache_dir'], task, cfg['model']['in_chans'])
    cfg['data']['intensity'], cfg['model']['in_chans'] = info['modes'], info['in_chans']   # the config follows the data
    num_classes = info['num_classes_cls' if task == 'classification' else 'num_classes_seg']
    if not num_classes:
        raise config.ConfigError(f"finetune.task={task}: data.layout {dcfg['layout']} has no "
                                 f"{'labels' if task == 'classification' else 'masks'}")
    splits = data.split_cases(cases, dcfg)
    arch = models.vit_kwargs(cfg['model'])                         # the model is built later, in the run
    dataset = lambda cases, d, s: data.SliceDataset(cases, d, arch['img_size'], arch['in_chans'], task,
                                                    train=s == 'labelled')
    sets = {s: dataset(splits[s], dcfg, s) for s in ('labelled', 'val', 'test')}
    out = {'info': info, 'splits': splits, 'num_classes': num_classes, 'sets': sets}
    if ext_dcfg:
        ext_cases, ext_info = prepare_external(ext_dcfg, cfg, task, num_classes)
        sets['external'] = dataset(ext_cases, ext_dcfg, 'external')          # all of its cases: no split
        out['external'] = {'name': data.source_name(ext_dcfg), 'cases': len(ext_cases), 'info': ext_info}
    return out


def prepare_external(ext, cfg, task, num_classes):
    """The external set's cases, read and checked as the main data's (prepare, for the model's resolved in_chans);
    its class count for the task must be the main data's. Returns (cases, info) as prepare does."""
    cases, info = data.prepare(ext, cfg['run']['cache_dir'], task, cfg['model']['in_chans'])
    ext['intensity'] = info['modes']                                # the config follows the data
    k = info['num_classes_cls' if task == 'classification' else 'num_classes_seg']
    if k != num_classes:
        raise data.DataError(f'data.external_*: the external test set {data.source_name(ext)} has {k or "no"} '
                             f"{task} classes, the main data {data.source_name(cfg['data'])} {num_classes}: an "
                             f'external test set must be of the same task, with the same classes')
    return cases, info


def log_data(run, d, dcfg, task):
    """The run log's lines about the data read_data read: resolved settings, warnings, the splits."""
    run.log(f"data.intensity {d['info']['intensity']}")
    run.log(f"model.in_chans {d['info']['channels']}")
    for line in data.warning_lines(d['info']['warnings']):
        run.log(line)
    if 'external' in d:
        ext, info = d['external'], d['external']['info']
        run.log(f"external test set: {ext['name']}, {ext['cases']} cases, data.intensity {info['intensity']}, "
                f"model.in_chans {info['channels']}")
        for line in data.warning_lines(info['warnings']):
            run.log(line)
    splits, sets = d['splits'], d['sets']
    run.log(f"{task}: {len(splits['labelled'])} labelled training cases ({len(sets['labelled'])} slices, "
            f"label_fraction {dcfg['label_fraction']}), {len(splits['val'])} val, {len(splits['test'])} test")


def report(run, metrics, d, saved_predictions, steps):
    """Write metrics.json (last: it marks the run finished, so a failure before it leaves a run that --resume
    completes), the test scores to TensorBoard, and the log's result lines."""
    runs.atomic_write(json.dumps(metrics, indent=1), run.dir / 'metrics.json')
    for split in ('test', 'external'):
        for k, v in metrics.get(split, {}).items():
            run.writer.add_scalar(f'{split}/{k}', v, steps)
    shown = lambda values: {k: round(v, 4) for k, v in values.items() if k != 'score'}
    run.log(f"test (best epoch {metrics['best_epoch']}): {shown(metrics['test'])}")
    if 'external' in metrics:
        run.log(f"external ({d['external']['name']}, {d['external']['cases']} cases): {shown(metrics['external'])}")
    saved = f' | predicted masks: {run.dir}/predictions' if saved_predictions else ''
    run.log(f'results: {run.dir}/metrics.json | model: {run.dir}/model.pth{saved} | TensorBoard: '
            f'{run.dir}/tensorboard')


# ----------------------------------------------------------------------------------------------------------------------

def main(args):
    cfg = config.load_config(args.config, args.set, stage=2)
    fcfg, dcfg = cfg['finetune'], cfg['data']
    task, init = fcfg['task'], fcfg['init']
    # 1. Check everything before anything is written: config, model shapes, the data, the targets file
    runs.preflight(cfg)
    models.build_head(cfg, num_classes=2)                          # the model's shape rules (depth, patch size)
    if init in config.TARGET_INITS:
        lora.check_layers(cfg)
    d = read_data(cfg)                                             # checked first: stage 0 can take minutes
    k, sets = d['num_classes'], d['sets']                          # k: the task's classes
    if init in config.PRETRAINED_INITS and not Path(targets_path(cfg)).is_file():
        raise config.ConfigError(f'finetune.targets: {targets_path(cfg)} does not exist: run pretrain_targets.py '
                                 f'first (or set finetune.init=random for plain PEFT)')
    backbone_path = pretrain_backbone.resolve(cfg)                  # stage 0 (once) before the run folder exists
    with runs.Run(cfg, fcfg['name'] or f'finetune-{task}-{init}', args.resume, result='metrics.json',
                  stage='finetune') as run:
        start = time.time()
        log_data(run, d, dcfg, task)
        # 2. --- TPP: the backbone, the targets (pre-trained ones for tpp) and the task head
        source = data.describe(d['info'], d['splits']['train'])
        model, counts, stage1 = build_model(cfg, run, backbone_path, k, init, source)
        # 3. Train; validation picks the best epoch
        loaders = {s: engine.make_loader(run, ds, fcfg['batch_size'], train=s == 'labelled') for s, ds in sets.items()}
        result = engine.train(run, model, loaders['labelled'], task_loss(task), fcfg, tag='finetune',
                              evaluate=lambda m: predictions.evaluate(run, m, loaders['val'], task, k))
        # 4. Test once, with the epoch validation chose: Dice on each case's own grid
        best = torch.load(run.dir / 'best.pth', map_location=run.device, weights_only=False)
        engine.load_trainable_state(model, best['model'])
        test_preds = predictions.predict(run, model, loaders['test'], task, native=True)   # every rank its share
        test = predictions.score(test_preds, sets['test'], task, k, native=True)
        external = 'external' in sets and predictions.evaluate(run, model, loaders['external'], task, k, native=True)
        diagnostics = lora_diagnostics(model, init, stage1)            # before the inference export merges LoRA
        # 5. Save: the predicted masks, the inference model, metrics.json
        saving = fcfg['save_predictions'] and task == 'segmentation'
        if saving:
            predictions.save_predictions(run, test_preds, sets['test'], dcfg)
        if run.main:
            save_inference_model(run, model, cfg, k)
            metrics = {'task': task, 'init': init, 'best_epoch': best['epoch'], 'val': best['metrics'], 'test': test,
                       'params': counts, 'history': result['history'], 'seconds': round(time.time() - start, 1),
                       'label_fraction': dcfg['label_fraction'], 'seed': cfg['run']['seed'], **diagnostics}
            if external:
                metrics.update(external=external, external_data={key: d['external'][key] for key in ('name', 'cases')})
            report(run, metrics, d, saving, result['steps'])
    return run.dir


if __name__ == '__main__':
    runs.cli(main, __doc__)
