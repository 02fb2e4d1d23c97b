"""Stage 2's evaluation per case, and its predictions written in the source's geometry.

Slices are predicted one batch at a time and reassembled per case: segmentation labels stacked into volumes (Dice
in 3D, metrics.py), classification probabilities averaged. The test split is scored on each case's own grid, and
save_predictions writes exactly those labels back in the geometry of the source files.
"""
import csv
import re

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.utils import save_image

import data
import engine
import metrics


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
        return metrics.classification_metrics(probs, labels, num_classes)
    dice = []
    for c, slices in preds.items():
        if native:
            pred, truth = case_labels(slices, dataset.axis), data.load_mask(dataset.cases[c], dataset.load)
        else:
            pred, truth = np.stack([slices[i] for i in sorted(slices)]), volumes(dataset)[c]
        dice.append(metrics.dice_per_class(pred, truth, num_classes))
    return metrics.segmentation_metrics(np.array(dice), num_classes)                        # dice: (cases, K-1)


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
# The predicted labels as files, on the source's grid

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
    ground truth / prediction at model resolution for the middle slice of the first case. Rank 0 writes."""
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
    image = data.unnormalize(item['image'][None], dcfg)[0, :1].clamp(0, 1)              # (1, H, W)
    pred = torch.from_numpy(preds[first][item['slice']])[None, None].float()            # (1, 1, H0, W0) own grid
    pred = F.interpolate(pred, item['mask'].shape, mode='nearest-exact')[0, 0]          # as data.resize does masks
    save_image([image.expand(3, -1, -1), overlay(image, item['mask']), overlay(image, pred)], out / 'overlay.png')
