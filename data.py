"""Images, masks and labels for tpp: the built-in synthetic data and the layouts medical-imaging users already have.

    cases, info = prepare(cfg['data'], cfg['run']['cache_dir'])    # list and validate every case before training
    splits = split_cases(cases, cfg['data'])                        # by case: train / val / test / labelled
    ds = SliceDataset(splits['train'], cfg['data'], img_size, in_chans, task='segmentation', train=True)

Layouts (data.layout): msd (imagesTr/ + labelsTr/ [+ dataset.json]), csv (a manifest of image,label / image,mask),
folder (root/<class>/*.png with x_mask.png beside x.png), and the built-in synthetic_ct / synthetic_us, which are
generated once into run.cache_dir in the msd+csv and folder layouts and then read by the same readers as real data.

Volumes are reoriented to the closest canonical (RAS) orientation and cut into 2D slices along data.axis; a 2D image
is one slice. Intensities go to [0, 1] (CT window, per-image percentiles, or as stored), then (x - mean) / std.
"""
from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import re
import shutil
import tempfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

GENERATOR_VERSION = 1      # bump when a generator changes: the cache folder name changes, so the data is regenerated
SYNTH_SEED = 0
SYNTH_CT = dict(n_cases=64, shape=(96, 96, 28), spacing=(3.6, 3.6, 5.0))
SYNTH_US = dict(n_per_class=100, size=128)
CT_CLASSES = ['background', 'liver', 'lesion']
CT_KINDS = ['cyst', 'metastasis']
US_CLASSES = ['benign', 'malignant', 'normal']
IMAGE_EXTS = ('.png', '.jpg', '.jpeg', '.bmp', '.tif', '.tiff')
BODY_LEVEL = 0.05          # a pixel above this (after scaling to [0, 1]) counts as body for data.skip_empty
SPLITS = ('train', 'val', 'test')


class DataError(ValueError):
    """Bad input data or data config. The message names the file (or config key) and the problem."""


@dataclass
class Case:
    id: str                   # stable case id; cases sharing an id (CSV 'case' column) stay on one side of a split
    image: Path
    mask: Path | None         # voxel/pixel mask (integer classes) or None
    label: int | None         # case/image class or None
    split: str | None = None  # from a CSV 'split' column, else None
    extra_masks: tuple = ()   # folder layout: more masks of the same image (BUSI x_mask_1.png), merged by maximum


# ----------------------------------------------------------------------------------------------------------------
# Reading files: decoded once per process, kept in an LRU cache of data.cache_mb
# ----------------------------------------------------------------------------------------------------------------

def is_nifti(path) -> bool:
    return str(path).lower().endswith(('.nii', '.nii.gz'))


def _stem(path: Path) -> str:
    name = path.name
    return name[:-7] if name.lower().endswith('.nii.gz') else name.rsplit('.', 1)[0]


def _read_nifti(path: Path):
    """-> (array in closest canonical (RAS) orientation, canonical affine). 2D arrays stay 2D."""
    img = nib.load(path)
    data = np.asanyarray(img.dataobj)
    while data.ndim > 3 and data.shape[-1] == 1:  # (X, Y, Z, 1) from some converters
        data = data[..., 0]
    if data.ndim > 3:
        raise DataError(f'{path}: {data.ndim}D image of shape {data.shape}; tpp reads one channel, so write '
                        f'each modality to its own file and list the one to use in a csv manifest')
    if data.ndim == 2:
        data = data[..., None]
    canon = nib.as_closest_canonical(nib.Nifti1Image(data, img.affine))
    arr = np.array(canon.dataobj)  # a copy we own, C-contiguous (reorienting leaves negative strides)
    if 1 in arr.shape:  # a single slice is a 2D image, whatever data.axis says
        arr = arr.reshape([s for s in arr.shape if s != 1] or [1])
    return arr, canon.affine


def _read_2d(path: Path, mask: bool):
    if mask and path.suffix.lower() in ('.jpg', '.jpeg'):
        raise DataError(f'{path}: JPEG masks change label values (lossy); save masks as PNG or NIfTI')
    with Image.open(path) as im:
        im.load()
        if mask and im.mode in ('RGB', 'RGBA', 'LA', 'CMYK', 'YCbCr'):
            rgb = np.asarray(im.convert('RGB'))
            if not (np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2])):
                raise DataError(f'{path}: colour mask; masks must hold one class index per pixel')
            return rgb[..., 0].copy()
        if not mask and im.mode in ('RGB', 'RGBA', 'LA', 'CMYK', 'YCbCr', 'P', '1'):
            im = im.convert('L')  # medical 2D images are grey: colour scans are averaged to one channel
        arr = np.array(im)  # masks: 'P' gives the palette indices, which are the classes
    if mask and arr.dtype == bool:
        arr = arr.astype(np.uint8)
    return arr


def _read(path: Path, mask: bool):
    """-> (array, affine or None). Binary 8-bit masks stored as 0/255 (BUSI, most PNG tools) become 0/1."""
    try:
        arr, affine = _read_nifti(path) if is_nifti(path) else (_read_2d(path, mask), None)
    except DataError:
        raise
    except Exception as e:  # nibabel/PIL/zlib raise many types for truncated or corrupt files
        raise DataError(f'{path}: unreadable or truncated file ({type(e).__name__}: {e})') from None
    if mask and arr.dtype == np.uint8 and arr.max() == 255 and np.isin(arr, (0, 255)).all():
        arr = (arr // 255).astype(np.uint8)
    return arr, affine


class _LRU:
    """Decoded arrays by (path, is_mask), least recently used dropped beyond `limit` bytes."""

    def __init__(self, limit=2 ** 31):
        self.items, self.nbytes, self.limit = OrderedDict(), 0, limit

    def get(self, key, load):
        if key in self.items:
            self.items.move_to_end(key)
            return self.items[key]
        value = self.items[key] = load()
        self.nbytes += value[0].nbytes
        while self.nbytes > self.limit and len(self.items) > 1:
            old = self.items.popitem(last=False)[1]
            self.nbytes -= old[0].nbytes
        return value


_CACHE = _LRU()
_RANGES = {}  # (path, mtime, size, intensity settings) -> (lo, hi): percentiles need the whole image: once per file


def load(path, mask=False):
    """(array, canonical affine or None) of an image or mask file, decoded once per process (again if the file
    changes: the key holds its modification time and size)."""
    path = Path(path)
    try:
        st = path.stat()
    except FileNotFoundError:
        raise DataError(f'{path}: file not found') from None
    return _CACHE.get((str(path), mask, st.st_mtime_ns, st.st_size), lambda: _read(path, mask))


def is_volume(path) -> bool:
    """True for a 3D image (sliced along data.axis), False for a 2D one (a single slice)."""
    return load(path)[0].ndim == 3


def load_mask(case: Case) -> np.ndarray:
    m = load(case.mask, mask=True)[0]
    for extra in case.extra_masks:
        m = np.maximum(m, load(extra, mask=True)[0])
    return m


def case_affine(case: Case) -> np.ndarray:
    """Canonical (RAS) affine of a volume case, for saving predicted masks as NIfTI; identity for PNG/JPEG."""
    affine = load(case.image)[1]
    return np.eye(4) if affine is None else affine


# ----------------------------------------------------------------------------------------------------------------
# Intensities: every mode is a linear map of [lo, hi] onto [0, 1] with clipping
# ----------------------------------------------------------------------------------------------------------------

def intensity_range(arr: np.ndarray, dcfg: dict) -> tuple[float, float]:
    """[lo, hi] of the image values mapped to [0, 1]: the CT window in HU, per-image percentiles, or the stored range
    (integers over their dtype's maximum, floats already in [0, 1])."""
    mode = dcfg['intensity']
    if mode == 'window':
        lo, hi = dcfg['window']
    elif mode == 'percentile':
        lo, hi = np.percentile(arr, dcfg['percentile'])
    elif mode == 'none':
        lo, hi = 0.0, (np.iinfo(arr.dtype).max if np.issubdtype(arr.dtype, np.integer) else 1.0)
    else:
        raise DataError(f"data.intensity: {mode!r} is not one of window | percentile | none")
    return float(lo), float(max(hi, lo + 1e-6))  # a constant image maps to 0, not to NaN


def to_unit(x: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    return ((x - lo) / (hi - lo)).clamp_(0.0, 1.0)


def normalize(x: torch.Tensor, mean, std) -> torch.Tensor:
    """(C, H, W) in [0, 1] -> (x - mean) / std per channel; a 1-value mean/std applies to every channel."""
    mean = torch.as_tensor(mean, dtype=x.dtype).view(-1, 1, 1)
    std = torch.as_tensor(std, dtype=x.dtype).view(-1, 1, 1)
    return (x - mean) / std


def _check_norm(dcfg, in_chans):
    for key in ('mean', 'std'):
        if len(dcfg[key]) not in (1, in_chans):
            raise DataError(f'data.{key}: {len(dcfg[key])} values for in_chans={in_chans}; give 1 or {in_chans}')
    if min(dcfg['std']) <= 0:
        raise DataError(f"data.std: {dcfg['std']} must be positive")


# ----------------------------------------------------------------------------------------------------------------
# Layout readers: each returns (cases, names) with names = {'class_names': seg names or None, 'label_names': ...}
# ----------------------------------------------------------------------------------------------------------------

def _label_names_json(path: Path):
    """Segmentation class names from a dataset.json: MSD {"0": "background"} or nnU-Net v2 {"background": 0}."""
    try:
        labels = json.loads(path.read_text())['labels']
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f'{path}: no readable "labels" entry ({type(e).__name__}: {e})') from None
    if all(str(k).isdigit() for k in labels):
        by_index = {int(k): str(v) for k, v in labels.items()}
    elif all(isinstance(v, int) for v in labels.values()):
        by_index = {v: str(k) for k, v in labels.items()}
    else:
        raise DataError(f'{path}: "labels" must map indices to names (region labels with lists are not supported)')
    return [by_index.get(i, str(i)) for i in range(max(by_index) + 1)]


def read_msd(root: Path):
    """Medical Segmentation Decathlon / nnU-Net: imagesTr/<id>.nii.gz (or <id>_0000.nii.gz), labelsTr/<id>.nii.gz."""
    images_dir, labels_dir = root / 'imagesTr', root / 'labelsTr'
    for d in (images_dir, labels_dir):
        if not d.is_dir():
            raise DataError(f'{d}: folder not found (data.layout msd expects imagesTr/ and labelsTr/ in data.root)')

    def listing(d):  # the MSD archives carry macOS '._*' resource files beside every volume: not images
        return {_stem(p): p for p in sorted(d.iterdir())
                if not p.name.startswith('.') and (is_nifti(p) or p.suffix.lower() in IMAGE_EXTS)}
    images, labels = listing(images_dir), listing(labels_dir)
    cases = []
    for stem, image in images.items():
        cid = stem
        if stem not in labels and re.fullmatch(r'.+_\d{4}', stem):  # nnU-Net v2 channel suffix
            cid = stem[:-5]
            if not stem.endswith('_0000'):
                raise DataError(f'{image}: extra input channel {stem[-4:]}; tpp reads one channel per case, list the '
                                f'one to use in a csv manifest (data.layout: csv)')
        if cid not in labels:
            raise DataError(f'{image}: no mask {labels_dir / (cid + ".nii.gz")}')
        cases.append(Case(cid, image, labels[cid], None))
    orphans = sorted(set(labels) - {c.id for c in cases})
    if orphans:
        raise DataError(f'{labels[orphans[0]]}: mask without an image in {images_dir}')
    js = root / 'dataset.json'
    return cases, {'class_names': _label_names_json(js) if js.exists() else None, 'label_names': None}


def read_csv(path: Path):
    """Manifest with columns image and label and/or mask (paths relative to the CSV), optional split and case."""
    if not path.is_file():
        raise DataError(f'{path}: manifest not found (data.root for data.layout csv is the CSV file)')
    with open(path, newline='', encoding='utf-8-sig') as f:  # -sig: spreadsheet programs add a BOM
        reader = csv.DictReader(f)
        rows = list(reader)
        columns = [c.strip() for c in reader.fieldnames or []]
    if 'image' not in columns:
        raise DataError(f'{path}: no "image" column (columns: {columns})')
    rows = [{k.strip(): (v or '').strip() for k, v in row.items() if k is not None} for row in rows]
    for n, row in enumerate(rows, start=2):  # line numbers as an editor shows them, after the header
        for col in ('image', 'mask', 'label', 'split', 'case'):
            if col in columns and not row[col]:
                raise DataError(f'{path} line {n}: empty "{col}" value')
        if 'split' in columns and row['split'] not in SPLITS:
            raise DataError(f'{path} line {n}: split {row["split"]!r} is not one of {SPLITS}')
    label_names = None
    if 'label' in columns:
        raw = [row['label'] for row in rows]
        if all(re.fullmatch(r'\d+', v) for v in raw):
            labels = [int(v) for v in raw]
        else:  # class names: indices in sorted order
            label_names = sorted(set(raw))
            labels = [label_names.index(v) for v in raw]
    base = path.parent
    images = [base / row['image'] for row in rows]
    stems = [_stem(p) for p in images]
    unique_stems = len(set(stems)) == len(stems)
    cases, seen = [], set()
    for n, (row, image) in enumerate(zip(rows, images), start=2):
        if image in seen:
            raise DataError(f'{path} line {n}: {image} is listed twice')
        seen.add(image)
        cid = row.get('case') or (_stem(image) if unique_stems else row['image'].rsplit('.nii', 1)[0])
        cases.append(Case(cid, image, base / row['mask'] if 'mask' in columns else None,
                          labels[n - 2] if 'label' in columns else None, row.get('split')))
    js = path.parent / 'dataset.json'  # optional segmentation class names, as in the msd layout
    return cases, {'class_names': _label_names_json(js) if js.exists() and 'mask' in columns else None,
                   'label_names': label_names}


def read_folder(root: Path, suffix: str):
    """root/<class>/<x>.png, masks root/<class>/<x><suffix>.png (and <x><suffix>_1.png ... merged)."""
    if not root.is_dir():
        raise DataError(f'{root}: folder not found (data.root for data.layout folder is the class-folder root)')
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith('.'))
    if not classes:
        raise DataError(f'{root}: no class folders')
    mask_re = re.compile(rf'(.+){re.escape(suffix)}(_\d+)?') if suffix else None
    cases, any_mask = [], False
    for label, cls in enumerate(classes):
        images, masks = [], {}
        for p in sorted((root / cls).iterdir()):
            if p.name.startswith('.'):
                continue
            if p.is_dir() or p.suffix.lower() not in IMAGE_EXTS:
                raise DataError(f'{p}: not a 2D image ({", ".join(IMAGE_EXTS)}); the folder layout holds only '
                                f'images and their masks')
            m = mask_re.fullmatch(_stem(p)) if mask_re else None
            if m:
                masks.setdefault(m.group(1), []).append(p)
            else:
                images.append(p)
        for p in images:
            found = sorted(masks.pop(_stem(p), []), key=lambda q: (len(q.name), q.name))  # x_mask before x_mask_1
            any_mask |= bool(found)
            cases.append(Case(f'{cls}/{_stem(p)}', p, found[0] if found else None, label,
                              extra_masks=tuple(found[1:])))
        if masks:
            orphan = sorted(masks.values())[0][0]
            raise DataError(f'{orphan}: mask without an image (expected {orphan.parent}/'
                            f'{mask_re.fullmatch(_stem(orphan)).group(1)}.<ext>)')
    if any_mask:
        for c in cases:
            if c.mask is None:
                raise DataError(f'{c.image}: no mask {c.image.parent / (_stem(c.image) + suffix + ".png")} '
                                f'(other images have masks)')
    return cases, {'class_names': None, 'label_names': classes}


# ----------------------------------------------------------------------------------------------------------------
# prepare: resolve the layout, then validate every case before training
# ----------------------------------------------------------------------------------------------------------------

def prepare(dcfg: dict, cache_dir) -> tuple[list[Case], dict]:
    """Resolve data.layout (synthetic sets are written to cache_dir on first use), list and validate every case.
    Returns (cases, info) with info keys num_classes_seg (incl. background) or None, num_classes_cls or None,
    class_names, label_names, is_volume, root."""
    _CACHE.limit = int(dcfg['cache_mb']) * 2 ** 20
    layout, root = dcfg['layout'], dcfg.get('root')
    if layout == 'synthetic_ct':
        root = synthetic_root('ct', cache_dir)
        cases, names = read_csv(root / 'manifest.csv')
    elif layout == 'synthetic_us':
        root = synthetic_root('us', cache_dir)
        cases, names = read_folder(root, '_mask')
        names['class_names'] = ['background', 'lesion']
    elif layout in ('msd', 'csv', 'folder'):
        if not root:
            raise DataError(f'data.root: must be set for data.layout {layout}')
        root = Path(root).expanduser()
        cases, names = {'msd': lambda: read_msd(root), 'csv': lambda: read_csv(root),
                        'folder': lambda: read_folder(root, dcfg['mask_suffix'])}[layout]()
    else:
        raise DataError(f'data.layout: {layout!r} is not one of synthetic_ct | synthetic_us | msd | csv | folder')
    if not cases:
        raise DataError(f'{root}: no cases found for data.layout {layout}')
    info = validate(cases, names, dcfg)
    info['root'] = str(root)
    return cases, info


def validate(cases: list[Case], names: dict, dcfg: dict) -> dict:
    """Decode every file once (they stay cached) and check it; the first problem raises a DataError naming the file."""
    if dcfg['intensity'] == 'window':
        flat = [c.image for c in cases if not is_nifti(c.image)]
        if flat:
            raise DataError(f'{flat[0]}: data.intensity window expects CT in Hounsfield units (NIfTI), not a 2D '
                            f'image file; set data.intensity: percentile (or none)')
    configured = dcfg.get('num_classes')
    seg_k = configured or (len(names['class_names']) if names['class_names'] else None)
    mask_max, any_volume = -1, False
    for c in cases:
        if not c.image.exists():
            raise DataError(f'{c.image}: image file not found (case {c.id})')
        image, affine = load(c.image)
        any_volume |= image.ndim == 3
        if c.mask is None:
            continue
        for path in (c.mask, *c.extra_masks):
            if not path.exists():
                raise DataError(f'{path}: mask file not found (image {c.image})')
            mask, mask_affine = load(path, mask=True)
            if mask.shape != image.shape:
                raise DataError(f'{path}: mask shape {mask.shape} differs from image {c.image} shape {image.shape} '
                                f'(both in canonical orientation)')
            if affine is not None and mask_affine is not None and not np.allclose(affine, mask_affine, atol=1e-3):
                raise DataError(f'{path}: mask affine differs from image {c.image} affine (the mask is not on the '
                                f'image grid):\n{mask_affine.round(4)}\nvs\n{affine.round(4)}')
            values = np.unique(mask)
            if values.dtype.kind == 'f' and not np.array_equal(values, np.round(values)):
                raise DataError(f'{path}: mask has non-integer values {values[:5]}...; masks hold class indices')
            if values[0] < 0:
                raise DataError(f'{path}: negative mask value {values[0]}; masks hold class indices 0, 1, ...')
            if seg_k and values[-1] >= seg_k:
                source = 'data.num_classes' if configured else 'dataset.json labels'
                raise DataError(f'{path}: mask values {values.astype(int).tolist()} outside the {seg_k} classes '
                                f'0..{seg_k - 1} ({source})')
            mask_max = max(mask_max, int(values[-1]))
    labelled = [c for c in cases if c.label is not None]
    cls_k = None
    if labelled:
        cls_k = configured or (len(names['label_names']) if names['label_names'] else
                               max(c.label for c in labelled) + 1)
        for c in labelled:
            if not 0 <= c.label < cls_k:
                raise DataError(f'{c.image}: label {c.label} outside the {cls_k} classes 0..{cls_k - 1} '
                                f'(data.num_classes)')
    seg_k = seg_k or (max(mask_max + 1, 2) if mask_max >= 0 else None)
    seg_names = ['background'] + [str(i) for i in range(1, seg_k)] if seg_k else None
    return {'num_classes_seg': seg_k, 'num_classes_cls': cls_k,
            'class_names': names['class_names'] or seg_names,
            'label_names': names['label_names'] or ([str(i) for i in range(cls_k)] if cls_k else None),
            'is_volume': any_volume}


# ----------------------------------------------------------------------------------------------------------------
# Splits by case
# ----------------------------------------------------------------------------------------------------------------

def _stratified_order(ids: list[str], labels: dict, seed: int) -> list[str]:
    """Ids in a seeded hash order, classes interleaved in proportion, so any prefix keeps the class balance. Hashing
    each id (not shuffling the list) keeps a case's place when other cases are added or removed."""
    def h(cid):
        return hashlib.sha1(f'{seed}:{cid}'.encode()).hexdigest()
    by_class = {}
    for cid in sorted(ids, key=h):
        by_class.setdefault(labels.get(cid), []).append(cid)
    key = {cid: ((j + 0.5) / len(group), h(cid)) for group in by_class.values() for j, cid in enumerate(group)}
    return sorted(ids, key=key.get)


def _count(n: int, fraction: float, key: str) -> int:
    if not 0 < fraction < 1:
        raise DataError(f'{key}: {fraction} must be in (0, 1): an empty split cannot be evaluated')
    return max(1, round(n * fraction))


def split_cases(cases: list[Case], dcfg: dict) -> dict[str, list[Case]]:
    """{'train', 'val', 'test', 'labelled'}: deterministic by case id (a CSV split column wins), stratified by label;
    'labelled' is the data.label_fraction subset of 'train' (at least one case). Lists keep the order of `cases`."""
    labels = {c.id: c.label for c in cases}
    ids = list(dict.fromkeys(c.id for c in cases))
    if any(c.split for c in cases):
        side = {}
        for c in cases:
            if side.setdefault(c.id, c.split) != c.split:
                raise DataError(f'{c.image}: case {c.id} is in split {c.split} and {side[c.id]} (split column)')
        groups = {s: {cid for cid in ids if side[cid] == s} for s in SPLITS}
        for s in SPLITS:
            if not groups[s]:
                raise DataError(f'split column: no case has split {s!r}')
    else:
        order = _stratified_order(ids, labels, dcfg['split_seed'])
        n_test = _count(len(ids), dcfg['test_fraction'], 'data.test_fraction')
        n_val = _count(len(ids), dcfg['val_fraction'], 'data.val_fraction')
        if n_test + n_val >= len(ids):
            raise DataError(f"data.val_fraction + data.test_fraction: {dcfg['val_fraction']} + "
                            f"{dcfg['test_fraction']} of {len(ids)} cases leaves no training case")
        groups = {'test': set(order[:n_test]), 'val': set(order[n_test:n_test + n_val]),
                  'train': set(order[n_test + n_val:])}
    fraction = dcfg['label_fraction']
    if not 0 < fraction <= 1:
        raise DataError(f'data.label_fraction: {fraction} must be in (0, 1]')
    train_order = _stratified_order(sorted(groups['train']), labels, dcfg['split_seed'])
    groups['labelled'] = set(train_order[:max(1, round(len(train_order) * fraction))])
    return {s: [c for c in cases if c.id in g] for s, g in groups.items()}


# ----------------------------------------------------------------------------------------------------------------
# Slices: resize, augmentation, normalisation
# ----------------------------------------------------------------------------------------------------------------

def take_slice(arr: np.ndarray, axis: int, index: int) -> np.ndarray:
    """2D slice (a view) of a canonical volume along `axis`; the image itself for 2D. A view, not np.take: on the
    Fortran-ordered arrays NIfTI gives, np.take measured ~100x slower."""
    return arr if arr.ndim == 2 else arr[(slice(None),) * axis + (index,)]


def random_affine(aug: dict, generator=None) -> torch.Tensor:
    """(1, 2, 3) affine_grid matrix for one random resized crop + flips + rotation: output coordinates -> input
    coordinates, both in [-1, 1]. One warp does all three, so image and mask see exactly the same geometry."""
    def u(lo, hi):
        return lo + (hi - lo) * torch.rand((), generator=generator).item()
    scale = u(*aug['crop_scale'])
    ratio = math.exp(u(math.log(3 / 4), math.log(4 / 3)))
    w, h = min(1.0, math.sqrt(scale * ratio)), min(1.0, math.sqrt(scale / ratio))  # crop side / image side
    cx, cy = u(w - 1, 1 - w), u(h - 1, 1 - h)
    fx = -1.0 if u(0, 1) < aug['hflip'] else 1.0
    fy = -1.0 if u(0, 1) < aug['vflip'] else 1.0
    a = math.radians(u(-aug['rotate'], aug['rotate']))
    return torch.tensor([[[math.cos(a) * w * fx, -math.sin(a) * h * fy, cx],
                          [math.sin(a) * w * fx, math.cos(a) * h * fy, cy]]], dtype=torch.float32)


def warp(image: torch.Tensor, mask: torch.Tensor | None, theta: torch.Tensor):
    """image (1, C, S, S) bilinear, mask (1, 1, S, S) float nearest, same grid; outside the image is 0 (background)."""
    grid = F.affine_grid(theta, list(image.shape), align_corners=False)  # (1, S, S, 2)
    image = F.grid_sample(image, grid, mode='bilinear', padding_mode='zeros', align_corners=False)
    if mask is not None:
        mask = F.grid_sample(mask, grid, mode='nearest', padding_mode='zeros', align_corners=False)
    return image, mask


def resize(image: torch.Tensor, mask: torch.Tensor | None, size: int):
    """image (1, 1, H, W) -> (1, 1, S, S) antialiased bilinear; mask nearest-exact, which samples the same pixel
    centres as bilinear with align_corners=False (plain 'nearest' is shifted by half a pixel)."""
    if image.shape[-2:] != (size, size):
        image = F.interpolate(image, (size, size), mode='bilinear', antialias=True, align_corners=False)
        if mask is not None:
            mask = F.interpolate(mask, (size, size), mode='nearest-exact')
    return image, mask


class SliceDataset(torch.utils.data.Dataset):
    """2D slices of the cases. task: None (images only, stage 1: applies data.skip_empty), 'classification' (every
    slice of a volume carries its case label) or 'segmentation'. Items are ordered by case, then slice."""

    def __init__(self, cases, dcfg, img_size, in_chans, task, train, num_classes=None):
        if task not in (None, 'classification', 'segmentation'):
            raise DataError(f'task: {task!r} is not one of None | classification | segmentation')
        _check_norm(dcfg, in_chans)
        self.cases, self.dcfg, self.size, self.in_chans = list(cases), dcfg, img_size, in_chans
        self.task, self.train, self.axis = task, train, dcfg['axis']
        if self.axis not in (0, 1, 2):
            raise DataError(f"data.axis: {self.axis} must be 0, 1 or 2")
        need = {'classification': 'label', 'segmentation': 'mask'}.get(task)
        for c in self.cases:
            if need and getattr(c, need) is None:
                raise DataError(f'{c.image}: no {need} for task {task}')
        self.index, self.skipped = [], 0  # index: (case index, slice index); skipped: near-empty slices dropped
        for ci, c in enumerate(self.cases):
            arr = load(c.image)[0]
            n = arr.shape[self.axis] if arr.ndim == 3 else 1
            keep = np.ones(n, bool)
            if task is None and dcfg['skip_empty'] > 0:
                keep = self._body_fraction(c.image, arr) >= dcfg['skip_empty']
                self.skipped += int((~keep).sum())
            self.index += [(ci, s) for s in np.flatnonzero(keep).tolist()]
        if not self.index:
            raise DataError(f'data.skip_empty: {dcfg["skip_empty"]} leaves no slice in {len(self.cases)} cases'
                            if self.cases else 'no cases for this dataset (empty split)')
        if task is None:
            self.num_classes = None
        elif num_classes or dcfg.get('num_classes'):
            self.num_classes = num_classes or dcfg['num_classes']
        elif task == 'classification':  # better pass info['num_classes_cls']: a subset may miss the last class
            self.num_classes = max(c.label for c in self.cases) + 1
        else:
            self.num_classes = max(int(load_mask(c).max()) for c in self.cases) + 1

    def _range(self, path, arr):
        d, st = self.dcfg, Path(path).stat()
        key = (str(path), st.st_mtime_ns, st.st_size, d['intensity'], tuple(d['window']), tuple(d['percentile']))
        if key not in _RANGES:
            _RANGES[key] = intensity_range(arr, d)
        return _RANGES[key]

    def _body_fraction(self, path, arr):
        """Per slice: fraction of pixels above BODY_LEVEL after intensity scaling."""
        lo, hi = self._range(path, arr)
        body = arr > lo + BODY_LEVEL * (hi - lo)
        if arr.ndim == 2:
            return np.array([body.mean()])
        return body.mean(axis=tuple(a for a in range(3) if a != self.axis))

    def __len__(self):
        return len(self.index)

    def sample_index(self, i) -> tuple[int, int]:
        """(case index, slice index) of item i, without loading it."""
        return self.index[i]

    def __getitem__(self, i):
        ci, s = self.index[i]
        case = self.cases[ci]
        arr = load(case.image)[0]
        x = torch.from_numpy(take_slice(arr, self.axis, s).astype(np.float32))
        x = to_unit(x, *self._range(case.image, arr))[None, None]  # (1, 1, H, W)
        m = None
        if self.task == 'segmentation':
            m = torch.from_numpy(take_slice(load_mask(case), self.axis, s).astype(np.float32))[None, None]
        x, m = resize(x, m, self.size)
        if self.train:
            x, m = warp(x, m, random_affine(self.dcfg['augment']))
        x = normalize(x[0].expand(self.in_chans, -1, -1), self.dcfg['mean'], self.dcfg['std'])  # (C, S, S)
        item = {'image': x.contiguous(), 'case': ci, 'slice': s}
        if self.task == 'classification':
            item['label'] = torch.tensor(case.label, dtype=torch.int64)
        elif self.task == 'segmentation':
            item['mask'] = m[0, 0].round().to(torch.int64)  # (S, S)
        return item


# ----------------------------------------------------------------------------------------------------------------
# Synthetic data: seeded generators writing real files, cached by version + seed + sizes
# ----------------------------------------------------------------------------------------------------------------

def synthetic_root(kind: str, cache_dir, seed=SYNTH_SEED, **sizes) -> Path:
    """Folder of a synthetic set ('ct', 'us' or 'upstream'), written on first use. The name holds the generator
    version, seed and sizes, so changed parameters regenerate; a temporary folder renamed at the end means a crash
    leaves no half data set, and of two processes writing at once (torchrun ranks) the first rename wins."""
    writer, defaults = {'ct': (write_synthetic_ct, SYNTH_CT), 'us': (write_synthetic_us, SYNTH_US),
                        'upstream': (write_upstream, {})}[kind]
    sizes = {**defaults, **sizes}
    tag = '-'.join(f'{k}{"x".join(map(str, v)) if isinstance(v, (tuple, list)) else v}' for k, v in sizes.items())
    final = Path(cache_dir) / f'synthetic_{kind}-v{GENERATOR_VERSION}-seed{seed}-{tag}'
    if final.exists():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f'.{final.name}.', dir=final.parent))
    try:
        writer(tmp, seed=seed, **sizes)
        os.rename(tmp, final)
    except OSError:
        if not final.exists():
            raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return final


def _smooth(x: np.ndarray, sigma_px) -> np.ndarray:
    """Gaussian filter over the first two axes by FFT (periodic edges do not matter for noise and soft edges)."""
    fy = np.fft.fftfreq(x.shape[0])[:, None]
    fx = np.fft.rfftfreq(x.shape[1])[None, :]
    sy, sx = (sigma_px, sigma_px) if np.isscalar(sigma_px) else sigma_px
    gain = np.exp(-2 * np.pi ** 2 * ((sy * fy) ** 2 + (sx * fx) ** 2))
    if x.ndim == 3:
        gain = gain[..., None]
    out = np.fft.irfft2(np.fft.rfft2(x, axes=(0, 1)) * gain, s=x.shape[:2], axes=(0, 1))
    return out.astype(np.float32)


def _blob(px, py, pz, rng, roughness):
    """Inside test of an ellipsoid-like blob in its own normalised coordinates, its outline perturbed by angular
    harmonics (0: smooth, larger: lobulated). Returns the normalised radius (< 1 inside)."""
    r = np.sqrt(px ** 2 + py ** 2 + pz ** 2)
    phi = np.arctan2(py, px)
    edge = 1.0
    for k in (2, 3, 5):
        edge = edge + roughness * rng.uniform(0.3, 1.0) / k * 2 * np.sin(k * phi + rng.uniform(0, 2 * np.pi))
    return r / edge


def _ct_case(rng, shape, spacing, kind):
    """One CT-like abdomen in canonical RAS voxel order: (HU int16 volume, uint8 mask 0 bg / 1 liver / 2 lesion)."""
    nx, ny, nz = shape
    x = ((np.arange(nx) - (nx - 1) / 2) * spacing[0]).astype(np.float32)[:, None, None]  # mm, + = patient right
    y = ((np.arange(ny) - (ny - 1) / 2) * spacing[1]).astype(np.float32)[None, :, None]  # + = anterior
    z = ((np.arange(nz) - (nz - 1) / 2) * spacing[2]).astype(np.float32)[None, None, :]  # + = superior
    half = np.array(shape) * spacing / 2
    zn = z / half[2]
    ax, ay = rng.uniform(0.82, 0.92) * half[0] * (1 - 0.04 * zn), rng.uniform(0.58, 0.68) * half[0] * (1 - 0.03 * zn)

    def ellipse(cx, cy, rx, ry):
        return ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 < 1

    hu = np.full(shape, -1000.0, np.float32)
    fat = rng.uniform(8, 20)
    hu[np.broadcast_to(ellipse(0, 0, ax, ay), shape)] = -100                  # subcutaneous fat
    hu[np.broadcast_to(ellipse(0, 0, ax - fat, ay - fat), shape)] = 45         # abdominal wall muscle
    inner = np.broadcast_to(ellipse(0, 0, ax - fat - 8, ay - fat - 8), shape)
    hu[inner] = -85                                                            # visceral fat
    for _ in range(rng.integers(6, 12)):                                       # bowel loops, some with gas
        cx, cy, r = rng.uniform(-0.6, 0.3) * ax, rng.uniform(-0.1, 0.7) * ay, rng.uniform(8, 22)
        loop = inner & ((x - cx) ** 2 + (y - cy) ** 2 + ((z - rng.uniform(-1, 1) * half[2]) / 2) ** 2 < r ** 2)
        hu[loop] = rng.uniform(15, 40)
        hu[loop & ((x - cx) ** 2 + (y - cy - 0.4 * r) ** 2 < (0.4 * r) ** 2)] = -900
    # liver: a large lobulated organ on the patient's right, through every slice
    lx, ly = rng.uniform(0.28, 0.38) * ax, rng.uniform(-0.05, 0.15) * ay
    liver = inner & (_blob((x - lx) / (0.55 * ax), (y - ly) / (0.62 * ay), z / (1.6 * half[2]), rng, 0.12) < 1)
    liver_hu = rng.uniform(55, 70)
    hu[liver] = liver_hu
    # distractors of liver-like density: spleen (upper slices), kidneys, vessels, spine, ribs
    spleen = inner & ~liver & ellipse(-0.55 * ax, -0.3 * ay, 0.2 * ax, 0.3 * ay) & (zn > -0.3)
    hu[spleen] = liver_hu + rng.uniform(-5, 10)
    for side in (-1, 1):
        kx, ky = side * 0.36 * ax, -0.48 * ay
        hu[inner & ~liver & ellipse(kx, ky, 0.13 * ax, 0.2 * ay) & (zn < 0.4)] = rng.uniform(140, 180)
        hu[inner & ~liver & ellipse(kx - side * 3, ky, 0.06 * ax, 0.1 * ay) & (zn < 0.4)] = 40
    hu[np.broadcast_to(ellipse(-0.08 * ax, -0.42 * ay, 10, 10), shape)] = rng.uniform(140, 200)  # aorta
    hu[np.broadcast_to(ellipse(0.12 * ax, -0.36 * ay, 11, 9), shape) & ~liver] = 90              # vena cava
    vert_y = -0.75 * ay
    disc = np.cos(2 * np.pi * z / rng.uniform(28, 34) + rng.uniform(0, 6.3)) > 0.8
    body = np.broadcast_to(ellipse(0, vert_y, 16, 14), shape)
    hu[body] = np.where(np.broadcast_to(disc, shape), 80, 250)[body]
    hu[np.broadcast_to(ellipse(0, vert_y, 16, 14) & ~ellipse(0, vert_y, 13, 11), shape)
       & ~np.broadcast_to(disc, shape)] = 700                                                   # cortical rim
    hu[np.broadcast_to(ellipse(0, vert_y - 22, 5, 9), shape)] = 600                             # spinous process
    for angle in np.linspace(0.6, 2.5, 5):
        for side in (-1, 1):
            rx, ry = side * np.cos(angle) * (ax - fat - 4), -np.sin(angle * 0.8) * (ay - fat - 4) * 0.9
            present = np.sin(2 * np.pi * z / 40 + rng.uniform(0, 6.3)) > 0.2
            hu[np.broadcast_to(ellipse(rx, ry, 5, 5) & present, shape)] = 650
    # lesions of one kind per case, spread along z so that most liver slices show one
    mask = liver.astype(np.uint8)
    n_lesions = rng.integers(3, 6)
    zs = (np.linspace(-0.75, 0.75, n_lesions) + rng.uniform(-0.12, 0.12, n_lesions)) * half[2]
    liver_idx = np.argwhere(liver)
    texture = _smooth(rng.normal(0, 1, shape).astype(np.float32), 1.5) if kind == 1 else None
    if texture is not None:
        texture /= texture.std()
    for zc in zs:
        near = liver_idx[np.abs(liver_idx[:, 2] - (zc / spacing[2] + (nz - 1) / 2)) < 1.5]
        if len(near) == 0:
            continue
        cx, cy, _ = (near[rng.integers(len(near))] - (np.array(shape) - 1) / 2) * spacing
        r = rng.uniform(16, 36)
        if kind == 0:   # cyst: round, sharp, homogeneous, near water density
            rho = _blob((x - cx) / r, (y - cy) / (r * rng.uniform(0.8, 1.2)), (z - zc) / (r * 1.1), rng, 0.03)
            lesion = liver & (rho < 1)
            hu[lesion] = rng.uniform(0, 25)
        else:           # metastasis: lobulated, heterogeneous, enhancing rim, sometimes a necrotic centre
            rho = _blob((x - cx) / r, (y - cy) / (r * rng.uniform(0.8, 1.2)), (z - zc) / (r * 1.1), rng, 0.35)
            lesion = liver & (rho < 1)
            core = liver_hu - rng.uniform(15, 40) + texture * rng.uniform(10, 25)
            core = np.where(rho < rng.uniform(0.2, 0.45), core - 20, core)
            core = np.where(rho > 0.7, core + rng.uniform(20, 45), core)
            hu[lesion] = core[lesion]
        mask[lesion] = 2
    hu = _smooth(hu, 0.6)  # partial-volume blur of edges
    noise = _smooth(rng.normal(0, 1, shape).astype(np.float32), 1.0)  # CT noise is spatially correlated
    hu += noise / noise.std() * rng.uniform(10, 18)
    return np.clip(np.round(hu), -1024, 3071).astype(np.int16), mask


def write_synthetic_ct(root, n_cases=64, shape=(96, 96, 28), spacing=(3.6, 3.6, 5.0), seed=SYNTH_SEED):
    """CT-like abdomens as a real MSD tree (imagesTr/, labelsTr/, dataset.json) plus manifest.csv (image,mask,label,
    label = lesion kind). Volumes are stored in LPS-like voxel order, as many DICOM converters do, so reading them
    exercises the reorientation to canonical."""
    root = Path(root)
    (root / 'imagesTr').mkdir(parents=True)
    (root / 'labelsTr').mkdir()
    ras = np.diag([*spacing, 1.0])
    ras[:3, 3] = -(np.array(shape) - 1) / 2 * spacing
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[:2, 3] = [shape[0] - 1, shape[1] - 1]  # stored voxel i is canonical voxel nx-1-i (same for j)
    stored_affine = ras @ flip
    rows = []
    for i in range(n_cases):
        kind = i % 2
        hu, mask = _ct_case(np.random.default_rng([seed, i]), tuple(shape), np.array(spacing, np.float32), kind)
        name = f'ct_{i:03d}.nii.gz'
        for arr, folder in ((hu, 'imagesTr'), (mask, 'labelsTr')):
            img = nib.Nifti1Image(np.ascontiguousarray(arr[::-1, ::-1]), stored_affine)
            img.header.set_xyzt_units('mm')
            nib.save(img, root / folder / name)
        rows.append((f'imagesTr/{name}', f'labelsTr/{name}', CT_KINDS[kind]))
    (root / 'dataset.json').write_text(json.dumps({
        'name': 'tpp synthetic CT', 'description': f'generated by tpp data.py v{GENERATOR_VERSION}, seed {seed}',
        'tensorImageSize': '3D', 'modality': {'0': 'CT'},
        'labels': {str(i): n for i, n in enumerate(CT_CLASSES)}, 'numTraining': n_cases, 'numTest': 0,
        'training': [{'image': f'./{r[0]}', 'label': f'./{r[1]}'} for r in rows], 'test': []}, indent=1))
    with open(root / 'manifest.csv', 'w', newline='') as f:
        w = csv.writer(f)
        w.writerow(['image', 'mask', 'label'])
        w.writerows(rows)


def _us_image(rng, kind, size):
    """One breast-ultrasound-like B-mode image (uint8) and its lesion mask (bool). kind: 0 benign, 1 malignant,
    2 normal (as BUSI's class folders, sorted)."""
    d = np.linspace(0, 1, size, dtype=np.float32)[:, None]   # depth (rows)
    x = np.linspace(0, 1, size, dtype=np.float32)[None, :]   # lateral (columns)

    def wave(amp):  # a gentle lateral undulation of a tissue boundary
        return amp * np.sin(2 * np.pi * (rng.uniform(0.5, 1.5) * x + rng.uniform(0, 1)))
    d1, d2 = rng.uniform(0.18, 0.3) + wave(0.03), rng.uniform(0.72, 0.85) + wave(0.04)
    echo = np.where(d < 0.035, 1.6, 0.0) + 0 * x
    echo = np.where((d >= 0.035) & (d < d1), 0.35, echo)                               # subcutaneous fat
    bands = 0.8 + 0.25 * np.sin(2 * np.pi * (d * rng.uniform(6, 12) + wave(0.08)))     # fibroglandular layers
    echo = np.where((d >= d1) & (d < d2), bands, echo)
    echo = np.where(d >= d2, 0.55 + 0.25 * np.sin(2 * np.pi * d * 40 + wave(1.0)), echo)  # pectoral muscle
    for _ in range(rng.integers(2, 5)):                                               # Cooper's ligaments
        x0, slope = rng.uniform(0, 1), rng.uniform(-1.5, 1.5)
        echo = np.where((np.abs(x - x0 - slope * d) < 0.006) & (d < d1 + 0.05), 1.4, echo)
    for _ in range(rng.integers(1, 4)):  # hypoechoic fat lobules: lesion-like distractors in every class
        cx, cy, a = rng.uniform(0.1, 0.9), rng.uniform(d1.mean(), 0.7), rng.uniform(0.04, 0.12)
        echo = np.where(((x - cx) / a) ** 2 + ((d - cy) / (a * rng.uniform(0.4, 0.8))) ** 2 < 1,
                        rng.uniform(0.3, 0.55), echo)
    mask = np.zeros((size, size), bool)
    if kind in (0, 1):
        # the BI-RADS cues overlap between classes on purpose: benign is usually oval, wider than tall, smooth, with
        # posterior enhancement; malignant usually irregular, rounder, heterogeneous, with a shadow and a halo
        cx, cy, a = rng.uniform(0.3, 0.7), rng.uniform(0.35, 0.6), rng.uniform(0.08, 0.2)  # a: half width
        b = a / (rng.uniform(1.2, 2.0) if kind == 0 else rng.uniform(0.8, 1.4))            # half height
        px, py = (x - cx) / a, (d - cy) / b
        phi = np.arctan2(py, px)
        lobes = rng.uniform(0.0, 0.08) if kind == 0 else rng.uniform(0.04, 0.15)
        edge = 1 + lobes * np.sin(rng.integers(3, 6) * phi + rng.uniform(0, 6.3))
        if kind == 1:  # spiculated margin, from barely to clearly
            edge = edge + rng.uniform(0.0, 0.25) * np.maximum(0, np.sin(rng.integers(9, 15) * phi +
                                                                          rng.uniform(0, 6.3))) ** 6
        rho = np.sqrt(px ** 2 + py ** 2) / edge
        mask = rho < 1
        behind = (np.abs(x - cx) < 0.8 * a) & (d > cy + b)
        blotch = _smooth(rng.normal(0, 1, (size, size)), size / 40) * 3
        heterogeneity = rng.uniform(0.0, 0.05) if kind == 0 else rng.uniform(0.05, 0.15)
        level = rng.uniform(0.1, 0.35) if kind == 0 else rng.uniform(0.05, 0.3)
        echo = np.where(mask, np.clip(level + heterogeneity * blotch, 0.02, 0.6), echo)
        if kind == 1:
            echo = np.where((rho >= 1) & (rho < 1.25), echo * rng.uniform(1.0, 1.5), echo)  # echogenic halo
        posterior = rng.uniform(1.0, 1.4) if kind == 0 else rng.uniform(0.4, 1.0)      # enhancement / shadow
        echo = np.where(behind & ~mask, echo * posterior, echo)
    echo = echo * np.exp(-rng.uniform(0.3, 1.2) * d)                      # attenuation left after gain control
    # speckle: complex Gaussian scatterers blurred by an anisotropic point spread function, envelope detected
    scatter = rng.normal(0, 1, (size, size)) + 1j * rng.normal(0, 1, (size, size))
    psf = (0.8, 1.8)  # (axial, lateral) in pixels
    env = np.abs(_smooth(scatter.real, psf) + 1j * _smooth(scatter.imag, psf))
    b_mode = np.log1p(12 * _smooth(echo, 1.0) * env / env.mean()) / np.log1p(12 * 3)  # log compression
    return np.clip(b_mode * rng.uniform(200, 250), 0, 255).astype(np.uint8), mask


def write_synthetic_us(root, n_per_class=100, size=128, seed=SYNTH_SEED):
    """Ultrasound-like 2D images in BUSI-like class folders: <class>/<class>_NNN.png and <class>_NNN_mask.png
    (0/255; all 0 for normal)."""
    root = Path(root)
    for k, cls in enumerate(US_CLASSES):
        (root / cls).mkdir(parents=True)
        for i in range(n_per_class):
            image, mask = _us_image(np.random.default_rng([seed, k, i]), k, size)
            Image.fromarray(image).save(root / cls / f'{cls}_{i:03d}.png')
            Image.fromarray(mask.astype(np.uint8) * 255).save(root / cls / f'{cls}_{i:03d}_mask.png')


def _upstream_image(rng, size):
    """A 'dead leaves' image: overlapping discs, squares and stripes of flat or textured grey with sharp edges; an
    appearance far from CT and ultrasound (no anatomy, no speckle) for the bootstrap backbone."""
    k = int(rng.integers(20, 50))
    yy, xx = np.mgrid[0:1:size * 1j, 0:1:size * 1j].astype(np.float32)
    cx, cy = rng.uniform(-0.1, 1.1, (2, k, 1, 1)).astype(np.float32)
    r = (0.03 + 0.35 * rng.uniform(0, 1, (k, 1, 1)) ** 2).astype(np.float32)  # many small leaves, few large
    shape = rng.integers(0, 3, (k, 1, 1))
    disc = (xx - cx) ** 2 + (yy - cy) ** 2 < r ** 2
    square = np.maximum(np.abs(xx - cx), np.abs(yy - cy)) < r
    bar = np.abs((xx - cx) * np.cos(r * 20) + (yy - cy) * np.sin(r * 20)) < r / 4
    inside = np.where(shape == 0, disc, np.where(shape == 1, square, bar))  # (k, S, S)
    freq, angle = rng.uniform(5, 30, (2, k, 1, 1)).astype(np.float32)
    grating = np.sin(2 * np.pi * freq * (xx * np.cos(angle) + yy * np.sin(angle)))
    striped = rng.uniform(0, 0.3, (k, 1, 1)) * (rng.uniform(0, 1, (k, 1, 1)) < 0.4)  # 40% of leaves are striped
    value = rng.uniform(0, 1, (k, 1, 1)) + striped * grating
    top = k - 1 - np.argmax(inside[::-1], axis=0)  # painter's order: the last leaf over a pixel is the one seen
    img = np.take_along_axis(value, top[None], axis=0)[0]
    img = np.where(inside.any(0), img, rng.uniform(0, 1))
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


def write_upstream(root, n=2000, size=64, seed=SYNTH_SEED):
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(_upstream_image(np.random.default_rng([seed, i]), size)).save(root / f'up_{i:05d}.png')


class _Upstream(torch.utils.data.Dataset):
    def __init__(self, files, dcfg, img_size, in_chans):
        _check_norm(dcfg, in_chans)
        self.images = torch.from_numpy(np.stack([np.array(Image.open(p)) for p in files]))  # (N, s, s) uint8
        self.dcfg, self.size, self.in_chans = dcfg, img_size, in_chans

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        x = resize(self.images[i][None, None].float() / 255, None, self.size)[0][0]  # (1, S, S)
        return {'image': normalize(x.expand(self.in_chans, -1, -1), self.dcfg['mean'], self.dcfg['std'])}


def upstream_dataset(dcfg, cache_dir, n, img_size, in_chans, seed) -> torch.utils.data.Dataset:
    """The synthetic upstream images (domain shift) for the bootstrap MAE: items {'image': (C, S, S)}, 8-bit grey
    over 255 then data.mean / data.std like SliceDataset. Written once as a PNG folder in cache_dir."""
    root = synthetic_root('upstream', cache_dir, seed=seed, n=n, size=img_size)
    return _Upstream(sorted(root.glob('*.png')), dcfg, img_size, in_chans)
