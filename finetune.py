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
import csv
import json
import re
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.utils import save_image

import config
import data
import engine
import lora
import models
import pretrain_backbone


# ----------------------------------------------------------------------------------------------------------------------
# Losses and metrics

def seg_loss(logits, mask):
    """Cross-entropy plus soft Dice over the foreground classes: Dice keeps small lesions from being ignored."""
    probs = logits.float().softmax(1)[:, 1:]                                      # (B, K-1, H, W)
    onehot = F.one_hot(mask, logits.shape[1]).permute(0, 3, 1, 2)[:, 1:].float()
    inter, union = (probs * onehot).sum((0, 2, 3)), (probs + onehot).sum((0, 2, 3))
    return F.cross_entropy(logits.float(), mask) + (1 - (2 * inter + 1) / (union + 1)).mean()


def dice_per_class(pred, gt, num_classes):
    """Dice of each foreground class in one volume. Convention: a class absent from both prediction and ground
    truth is NaN (left out of the averages); absent from the ground truth but predicted scores 0."""
    out = []
    for c in range(1, num_classes):
        p, g = pred == c, gt == c
        denom = p.sum() + g.sum()
        out.append(float('nan') if denom == 0 else 2.0 * (p & g).sum() / denom)
    return out


def auc_ovr(probs, labels):
    """Macro one-vs-rest ROC AUC (Mann-Whitney U with tied ranks averaged), over classes with both outcomes."""
    aucs = []
    for c in range(probs.shape[1]):
        pos = labels == c
        if pos.all() or not pos.any():
            continue
        order = probs[:, c].argsort()
        ranks = np.empty(len(order))
        ranks[order] = np.arange(1, len(order) + 1)
        for value in np.unique(probs[:, c]):                                      # average ranks of ties
            tie = probs[:, c] == value
            ranks[tie] = ranks[tie].mean()
        n_pos, n_neg = pos.sum(), (~pos).sum()
        aucs.append((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))
    return float(np.mean(aucs)) if aucs else float('nan')


def classification_metrics(probs, labels, num_classes):
    pred = probs.argmax(1)
    f1 = []
    for c in range(num_classes):
        tp, fp, fn = ((pred == c) & (labels == c)).sum(), ((pred == c) & (labels != c)).sum(), ((pred != c) & (labels == c)).sum()
        if tp + fp + fn:   # a class absent from both labels and predictions is left out (as scikit-learn)
            f1.append(2 * tp / (2 * tp + fp + fn))
    auc = auc_ovr(probs, labels)
    acc = float((pred == labels).mean())
    return {'score': auc if np.isfinite(auc) else acc, 'accuracy': acc, 'macro_f1': float(np.mean(f1)), 'auc': auc,
            'majority_floor': float(np.bincount(labels, minlength=num_classes).max() / len(labels))}


# ----------------------------------------------------------------------------------------------------------------------
# Evaluation, per case: slices are reassembled into volumes (Dice in 3D) or their class probabilities averaged

@torch.no_grad()
def predict(run, model, loader, task, native=False):
    """{case: {slice: prediction}} over the whole split (all ranks gathered; DistributedSampler padding removed):
    class probabilities, or labels (uint8) at model resolution or, with native, on the slice's own grid: its logits
    upsampled bilinearly to the slice's size before the argmax, one slice at a time (a volume's logits at full size
    need not fit in memory)."""
    model.eval()
    dataset, items, planes = loader.dataset, [], {}
    for batch in loader:
        with run.autocast():
            logits = model(batch['image'].to(run.device, non_blocking=True)).float()              # (B, K, S, S)
        cases = batch['case'].tolist()
        if task == 'classification':
            out = logits.softmax(1).cpu().numpy()
        elif native:
            out = [F.interpolate(x[None], native_plane(dataset, c, planes), mode='bilinear', align_corners=False)
                   [0].argmax(0).to(torch.uint8).cpu().numpy() for x, c in zip(logits, cases)]    # (H, W) each
        else:
            out = logits.argmax(1).to(torch.uint8).cpu().numpy()
        items += zip(cases, batch['slice'].tolist(), out)
    preds = {}
    for case, index, value in engine.gather(run, items):
        preds.setdefault(case, {})[index] = value
    return preds


def native_plane(dataset, c, planes):
    """(H, W) of case c's slices on its own grid: its mask's canonical shape without data.axis (cached in planes)."""
    if c not in planes:
        shape = dataset.load(dataset.cases[c].mask, mask=True)[0].shape
        planes[c] = shape if len(shape) == 2 else shape[:dataset.axis] + shape[dataset.axis + 1:]
    return planes[c]


def case_labels(slices, axis):
    """{slice: (H, W) labels} of one case -> its labels on the case's canonical grid, as data.load reads the image:
    one slice is a 2D image (a volume read there has no axis of length 1), more are stacked along data.axis."""
    vol = np.stack([slices[i] for i in sorted(slices)])                                     # (S, H, W)
    return vol[0] if len(vol) == 1 else np.moveaxis(vol, 0, axis)


def evaluate(run, model, loader, task, num_classes, native=False):
    """The metrics of a model on a split's loader (predict, then score)."""
    return score(predict(run, model, loader, task, native), loader.dataset, task, num_classes, native)


def score(preds, dataset, task, num_classes, native=False):
    """Metrics of predict's output. Segmentation: Dice per class per volume, then the mean over volumes per class and
    over classes; native: against each case's mask as read (the test split, the Dice that the saved predictions and
    the original masks give), else against the masks resized to model resolution (validation: faster)."""
    if task == 'classification':
        probs = np.stack([np.mean(list(slices.values()), 0) for slices in preds.values()])   # (cases, K)
        labels = np.array([dataset.cases[c].label for c in preds])
        return classification_metrics(probs, labels, num_classes)
    dice = []
    for c, slices in preds.items():
        if native:
            pred, truth = case_labels(slices, dataset.axis), data.load_mask(dataset.cases[c], dataset.load)
        else:
            pred, truth = np.stack([slices[i] for i in sorted(slices)]), volumes(dataset)[c]
        dice.append(dice_per_class(pred, truth, num_classes))
    dice = np.array(dice)                                                                   # (cases, K-1)
    per_class = np.nanmean(dice, 0) if len(dice) else np.full(num_classes - 1, np.nan)
    mean = float(np.nanmean(per_class))
    return {'score': mean, 'dice_mean': mean, **{f'dice_{c + 1}': float(d) for c, d in enumerate(per_class)}}


def volumes(dataset):
    """Ground-truth masks at model resolution, reassembled per case: {case: (S, H, W)}. Cached on the dataset."""
    if not hasattr(dataset, '_volumes'):
        slices = {}
        for i in range(len(dataset)):
            item = dataset[i]
            slices.setdefault(item['case'], {})[item['slice']] = item['mask'].numpy()
        dataset._volumes = {c: np.stack([s[i] for i in sorted(s)]) for c, s in slices.items()}
    return dataset._volumes


# ----------------------------------------------------------------------------------------------------------------------
# The external test set: a second data set of the same task (another site, another public set)

def data_name(dcfg):
    """The data set a data config names, for messages: its layout and root, or a built-in layout's site."""
    where = f"site {dcfg['site']}" if dcfg['layout'] in data.SYNTHETIC_LAYOUTS else dcfg['root']
    return f"data.layout {dcfg['layout']} ({where})"


def external_config(dcfg):
    """The data config of the external test set (data.external_root / external_layout / external_site: the data
    keys of a second data set, the other keys shared; config.load_config checked them), or None when neither is set.
    Called before prepare resolves data.intensity auto in dcfg, so the external set resolves its own."""
    if dcfg['external_root'] is None and dcfg['external_layout'] is None:
        return None
    layout = dcfg['external_layout'] or dcfg['layout']
    site = dcfg['external_site'] if layout in data.SYNTHETIC_LAYOUTS else dcfg['site']
    return {**dcfg, 'layout': layout, 'root': dcfg['external_root'], 'site': site}


def prepare_external(ext, cfg, task, num_classes):
    """The external set's cases, read and checked as the main data's (prepare, for the model's resolved in_chans);
    its class count for the task must be the main data's. Returns (cases, info) as prepare does."""
    cases, info = data.prepare(ext, cfg['run']['cache_dir'], task, cfg['model']['in_chans'])
    k = info['num_classes_cls' if task == 'classification' else 'num_classes_seg']
    if k != num_classes:
        raise data.DataError(f'data.external_*: the external test set {data_name(ext)} has {k or "no"} {task} '
                             f"classes, the main data {data_name(cfg['data'])} {num_classes}: an external test set "
                             f'must be of the same task, with the same classes')
    return cases, info


# ----------------------------------------------------------------------------------------------------------------------

def build_model(cfg, run, backbone_path, num_classes, init, source):
    """Backbone (+ targets) + task head, with exactly the parameters of this init method trainable. source: the data
    fine-tuned on (data.describe of the training split), compared with the data the targets were pre-trained on."""
    backbone = models.build_backbone(cfg)
    run.log(pretrain_backbone.load_checkpoint(backbone, backbone_path))
    fingerprint = lora.backbone_fingerprint(backbone)
    if init in config.TARGET_INITS:
        lora.inject(backbone, cfg['peft'])                         # the same target modules as stage 1
    if init in ('tpp', 'linear_tpp'):                              # --- TPP: start from the pre-trained targets
        path = targets_path(cfg)
        expected = {'arch': models.vit_kwargs(cfg['model']), 'peft': lora.structure(backbone),
                    'backbone': fingerprint}
        meta = lora.load_targets(path, backbone, expected)
        run.log(f"targets: loaded {path} (pre-trained for {meta['steps']} steps, pretext {meta['pretext']})")
        pretrained_on = meta.get('data')                         # None in the targets files of an older tpp
        if pretrained_on and pretrained_on != source:           # legitimate (other data), but worth knowing
            named = lambda d: f"{d['layout']} {d['root']} ({d['fingerprint']})"
            run.log(f'warning: targets were pre-trained on {named(pretrained_on)}, fine-tuning on {named(source)}')
    model, counts = add_head(cfg, backbone, num_classes, init)
    model.to(run.device)
    run.log(f"parameters ({init}): total {counts['total']:,} | trainable {counts['trainable']:,} "
            f"({100 * counts['trainable'] / counts['total']:.2f}%) | targets {counts['targets']:,}")
    return model, counts


def targets_path(cfg):
    """finetune.targets, or stage 1's file: <run.out_dir>/<pretrain.name>/targets.pth."""
    return cfg['finetune']['targets'] or f"{cfg['run']['out_dir']}/{cfg['pretrain']['name']}/targets.pth"


def lora_diagnostics(cfg, model, init):
    """For LoRA runs (init random or tpp): update_ratio, the size of the final update next to the weight it adapts;
    for tpp also target_survival, how much of the stage-1 update the final one keeps (lora.update_survival)."""
    if init not in ('tpp', 'random') or not any(isinstance(m, lora.LoRALinear) for m in model.modules()):
        return {}
    out = {'update_ratio': lora.update_ratio(model.backbone)}
    if init == 'tpp':
        stage1 = torch.load(targets_path(cfg), map_location='cpu', weights_only=True)['targets']
        out['target_survival'] = lora.update_survival(stage1, model.backbone)
    return out


def add_head(cfg, backbone, num_classes, init):
    """TaskModel of the backbone (targets already inserted) and the task head, with exactly the parameters of this
    init method trainable: the targets and the head, everything ('full') or the head alone ('linear', 'linear_tpp')."""
    model = models.TaskModel(backbone, models.build_head(cfg, num_classes))
    extra = model.head.parameters()
    if init == 'full':   # every parameter the forward uses (DDP needs that): segmentation skips the final norm
        extra = [p for n, p in model.named_parameters() if n != 'backbone.pos_embed'       # fixed sin-cos, as in MAE
                 and not (cfg['finetune']['task'] == 'segmentation' and n.startswith('backbone.norm.'))]
    return model, lora.mark_trainable(model, extra=list(extra), targets=init != 'linear_tpp')


def save_inference_model(run, model, cfg, num_classes):
    """model.pth: the fine-tuned model for inference. With finetune.merge_lora the LoRA updates are folded into the
    backbone weights and the LoRA factors dropped, so it loads into a plain ViT (adapters, if any, stay)."""
    merged = cfg['finetune']['merge_lora'] and any(isinstance(m, lora.LoRALinear) for m in model.modules())
    sd = lora.merged_state_dict(model) if merged else model.state_dict()
    engine.atomic_save({'model': sd, 'arch': models.vit_kwargs(cfg['model']), 'task': cfg['finetune']['task'],
                        'num_classes': num_classes, 'lora_merged': merged, 'config': cfg}, run.dir / 'model.pth')


PALETTE = torch.tensor([[0.0, 0.0, 0.0], [0.1, 0.9, 0.2], [0.95, 0.15, 0.1], [0.2, 0.4, 1.0], [1.0, 0.8, 0.1]])


def overlay(image, mask):
    """image (1, H, W) in [0, 1], mask (H, W) class indices -> (3, H, W): classes tinted over the grey image."""
    color = PALETTE[mask.long() % len(PALETTE)].permute(2, 0, 1)                    # (3, H, W)
    return torch.where(mask > 0, 0.55 * image + 0.45 * color, image.expand(3, -1, -1))


def prediction_names(cases):
    """One file name per case, a plain name in the predictions folder whatever the case id holds: '/' (class folders,
    a CSV case column) becomes '__', any other character but letters, digits, '.', '-' and '_' becomes '_', and a name
    already taken (cases sharing an id, or ids equal once made safe, compared ignoring case as some file systems do)
    gets a suffix _2, _3, ...; NIfTI for volumes, PNG for 2D images."""
    names, taken = [], set()
    for case in cases:
        stem = re.sub(r'[^\w.-]', '_', case.id.replace('/', '__')).lstrip('.') or 'case'
        ext = '.nii.gz' if data.is_nifti(case.image) else '.png'
        name, n = f'{stem}_pred{ext}', 1
        while name.casefold() in taken:
            n += 1
            name = f'{stem}_{n}_pred{ext}'
        taken.add(name.casefold())
        names.append(name)
    return names


def save_predictions(run, preds, dataset, dcfg):
    """predict's native labels of the test cases (the ones the test Dice scored), one file per case on its source's
    own grid: NIfTI with the source's shape, voxel order and affine, or a PNG of the image's size, holding class
    indices as data.py reads masks; cases.csv pairs each file with its case, image and mask; overlay.png shows image /
    ground truth / prediction at model resolution for the middle slice of the first case."""
    if not run.main:
        return
    out = run.dir / 'predictions'
    out.mkdir(exist_ok=True)
    names = prediction_names([dataset.cases[c] for c in preds])
    with open(out / 'cases.csv', 'w', newline='') as f:
        table = csv.writer(f)
        table.writerow(['case', 'image', 'mask', 'prediction'])
        for (c, slices), name in zip(preds.items(), names):
            case, labels = dataset.cases[c], case_labels(slices, dataset.axis)
            if data.is_nifti(case.image):
                nib.save(data.to_source_grid(labels, case.image), out / name)
            else:
                Image.fromarray(labels).save(out / name)
            table.writerow([case.id, case.image, case.mask, name])
    first = next(iter(preds))
    items = [i for i in range(len(dataset)) if dataset.sample_index(i)[0] == first]
    item = dataset[items[len(items) // 2]]                                              # middle slice
    image = (item['image'][:1] * dcfg['std'][0] + dcfg['mean'][0]).clamp(0, 1)          # (1, H, W)
    pred = torch.from_numpy(preds[first][item['slice']])[None, None].float()            # (1, 1, H0, W0) own grid
    pred = F.interpolate(pred, item['mask'].shape, mode='nearest-exact')[0, 0]          # as data.resize does masks
    save_image([image.expand(3, -1, -1), overlay(image, item['mask']), overlay(image, pred)], out / 'overlay.png')


def main(args):
    cfg = config.load_config(args.config, args.set, stage=2)
    fcfg, dcfg = cfg['finetune'], cfg['data']
    task, init = fcfg['task'], fcfg['init']
    engine.preflight(cfg)
    models.build_head(cfg, num_classes=2)                          # the model's shape rules (depth, patch size)
    if init in config.TARGET_INITS:
        lora.check_layers(cfg)
    ext_dcfg = external_config(dcfg)                                # the external test set's data config, or None
    cases, info = data.prepare(dcfg, cfg['run']['cache_dir'], task, cfg['model']['in_chans'])   # checked first:
    cfg['model']['in_chans'] = info['in_chans']                  # stage 0 can take minutes; the model follows the data
    num_classes = info['num_classes_cls' if task == 'classification' else 'num_classes_seg']
    if not num_classes:
        raise config.ConfigError(f"finetune.task={task}: data.layout {dcfg['layout']} has no "
                                 f"{'labels' if task == 'classification' else 'masks'}")
    splits = data.split_cases(cases, dcfg)
    arch = models.vit_kwargs(cfg['model'])
    sets = {s: data.SliceDataset(splits[s], dcfg, arch['img_size'], arch['in_chans'], task, train=s == 'labelled')
            for s in ('labelled', 'val', 'test')}
    if ext_dcfg:                                                    # all of its cases: no split
        ext_cases, ext_info = prepare_external(ext_dcfg, cfg, task, num_classes)
        sets['external'] = data.SliceDataset(ext_cases, ext_dcfg, arch['img_size'], arch['in_chans'], task,
                                             train=False)
    if init in ('tpp', 'linear_tpp') and not Path(targets_path(cfg)).is_file():
        raise config.ConfigError(f'finetune.targets: {targets_path(cfg)} does not exist: run pretrain_targets.py '
                                 f'first (or set finetune.init=random for plain PEFT)')
    backbone_path = pretrain_backbone.resolve(cfg)                  # stage 0 (once) before the run folder exists
    with engine.Run(cfg, fcfg['name'] or f'finetune-{task}-{init}', args.resume, result='metrics.json',
                    stage='finetune') as run:
        run.log(f"data.intensity {info['intensity']}")
        run.log(f"model.in_chans {info['channels']}")
        for line in data.warning_lines(info['warnings']):
            run.log(line)
        if ext_dcfg:
            run.log(f"external test set: {data_name(ext_dcfg)}, {len(ext_cases)} cases, data.intensity "
                    f"{ext_info['intensity']}, model.in_chans {ext_info['channels']}")
            for line in data.warning_lines(ext_info['warnings']):
                run.log(line)
        start = time.time()
        run.log(f"{task}: {len(splits['labelled'])} labelled training cases ({len(sets['labelled'])} slices, "
                f"label_fraction {dcfg['label_fraction']}), {len(splits['val'])} val, {len(splits['test'])} test")
        model, counts = build_model(cfg, run, backbone_path, num_classes, init,
                                    data.describe(info, splits['train']))

        loader = engine.make_loader(run, sets['labelled'], fcfg['batch_size'], train=True)
        val_loader, test_loader = (engine.make_loader(run, sets[s], fcfg['batch_size'], train=False)
                                   for s in ('val', 'test'))
        if task == 'classification':
            loss_fn = lambda net, batch: F.cross_entropy(net(batch['image']).float(), batch['label'])
        else:
            loss_fn = lambda net, batch: seg_loss(net(batch['image']), batch['mask'])
        result = engine.train(run, model, loader, loss_fn, fcfg, tag='finetune',
                              evaluate=lambda m: evaluate(run, m, val_loader, task, num_classes))

        best = torch.load(run.dir / 'best.pth', map_location=run.device, weights_only=False)
        engine.load_trainable_state(model, best['model'])              # test once, with the epoch validation chose
        test_preds = predict(run, model, test_loader, task, native=True)   # every rank its share; Dice on the own grid
        test = score(test_preds, test_loader.dataset, task, num_classes, native=True)
        external = None
        if ext_dcfg:                                                # the same model and evaluation as the test split
            ext_loader = engine.make_loader(run, sets['external'], fcfg['batch_size'], train=False)
            external = evaluate(run, model, ext_loader, task, num_classes, native=True)
        diagnostics = lora_diagnostics(cfg, model, init)               # before the inference export merges LoRA
        if fcfg['save_predictions'] and task == 'segmentation':
            save_predictions(run, test_preds, test_loader.dataset, dcfg)   # the labels test scored; rank 0 writes
        if run.main:
            save_inference_model(run, model, cfg, num_classes)
            metrics = {'task': task, 'init': init, 'best_epoch': best['epoch'], 'val': best['metrics'], 'test': test,
                       'params': counts, 'history': result['history'], 'seconds': round(time.time() - start, 1),
                       'label_fraction': dcfg['label_fraction'], 'seed': cfg['run']['seed'], **diagnostics}
            if external:
                metrics.update(external=external, external_data={'name': data_name(ext_dcfg), 'cases': len(ext_cases)})
            # last: metrics.json marks the run finished (a failure before it leaves a run that --resume completes)
            engine.atomic_write(json.dumps(metrics, indent=1), run.dir / 'metrics.json')
            for split, values in (('test', test), ('external', external or {})):
                for k, v in values.items():
                    run.writer.add_scalar(f'{split}/{k}', v, result['steps'])
            shown = lambda values: {k: round(v, 4) for k, v in values.items() if k != 'score'}
            saved = (f' | predicted masks: {run.dir}/predictions' if fcfg['save_predictions'] and task == 'segmentation'
                     else '')
            run.log(f'test (best epoch {best["epoch"]}): {shown(test)}')
            if external:
                run.log(f'external ({data_name(ext_dcfg)}, {len(ext_cases)} cases): {shown(external)}')
            run.log(f'results: {run.dir}/metrics.json | model: {run.dir}/model.pth{saved} | TensorBoard: '
                    f'{run.dir}/tensorboard')
    return run.dir


if __name__ == '__main__':
    engine.cli(main, __doc__)
