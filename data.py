"""Images, masks and labels for tpp: read, check, split and slice the layouts medical-imaging users already have.

    cases, info = prepare(cfg['data'], cfg['run']['cache_dir'])    # list and validate every case before training
    cfg['data']['intensity'] = info['modes']                        # auto resolved from the data
    splits = split_cases(cases, cfg['data'])                        # by case: train / val / test / labelled
    ds = SliceDataset(splits['train'], cfg['data'], img_size, in_chans, task='segmentation', train=True)

Layouts (data.layout): msd (imagesTr/ + labelsTr/ [+ dataset.json]), csv (a manifest of image,label / image,mask),
folder (root/<class>/*.png with x_mask.png beside x.png), medmnist (one MedMNIST v2 .npz, read into memory), and the
built-in synthetic_ct / synthetic_mri / synthetic_us, which synthetic.py writes once into run.cache_dir in the
msd+csv and folder layouts; they are read here like real data.

Volumes are reoriented to the closest canonical (RAS) orientation and cut into 2D slices along data.axis; a 2D image
is one slice. Channels (RGB colour, MSD 4D sequences, nnU-Net channel files) become the model's input channels, and
model.in_chans null follows them (prepare resolves it). Intensities go to [0, 1] per channel (CT window, per-image
percentiles, or as stored; data.intensity auto picks one from the data in prepare), then (x - mean) / std.
"""
from __future__ import annotations

import csv
import functools
import hashlib
import json
import math
import re
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

import synthetic
from config import UserError

IMAGE_EXTS = ('.png', '.jpg', '.jpeg', '.bmp', '.tif', '.tiff')
INTENSITIES = ('window', 'percentile', 'none')   # prepare resolves data.intensity auto to one (resolve_intensity)
BODY_LEVEL = 0.05          # a pixel above this (after scaling to [0, 1]) counts as body for data.skip_empty
SPLITS = ('train', 'val', 'test')
SYNTHETIC_LAYOUTS = ('synthetic_ct', 'synthetic_mri', 'synthetic_us')   # built in: synthetic.py writes them (data.site)


class DataError(UserError, ValueError):
    """Bad input data or data config. The message names the file (or config key) and the problem."""


@dataclass
class Case:
    id: str                   # stable case id; cases sharing an id (CSV 'case' column) stay on one side of a split
    image: Path
    mask: Path | None         # voxel/pixel mask (integer classes) or None
    label: int | None         # case/image class or None
    split: str | None = None  # from a CSV 'split' column, else None
    extra_masks: tuple = ()   # folder layout: more masks of the same image (BUSI x_mask_1.png), merged by maximum
    extra_channels: tuple = ()  # msd layout: the image's other nnU-Net channel files (<id>_0001 ...), in order


# ----------------------------------------------------------------------------------------------------------------
# Reading files
# ----------------------------------------------------------------------------------------------------------------

def is_nifti(path) -> bool:
    return str(path).lower().endswith(('.nii', '.nii.gz'))


def _stem(path: Path) -> str:
    name = path.name
    return name[:-7] if name.lower().endswith('.nii.gz') else name.rsplit('.', 1)[0]


def channels_of(image: np.ndarray) -> list[np.ndarray]:
    """An image's channels, each a spatial array (H, W) or (X, Y, Z) (views). A grey image is its own one channel; a
    multi-channel image is (X, Y, Z, C), channels last, and (H, W, 1, C) when 2D: the readers make a file that is one
    voxel thick 2D, so a volume never has Z = 1."""
    if image.ndim < 4:
        return [image]
    return [image[:, :, 0, c] if image.shape[2] == 1 else image[..., c] for c in range(image.shape[3])]


def _read_nifti(path: Path):
    """-> (array in closest canonical (RAS) orientation, canonical affine). 2D arrays stay 2D; a 4D (X, Y, Z, C) file
    (MSD multi-sequence) keeps its channels last (channels_of)."""
    img = nib.load(path)
    data = np.asanyarray(img.dataobj)
    while data.ndim > 3 and data.shape[-1] == 1:  # (X, Y, Z, 1) from some converters
        data = data[..., 0]
    if data.ndim > 4:
        raise DataError(f'{path}: {data.ndim}D image of shape {data.shape}; tpp reads 2D, 3D and 4D '
                        f'(X, Y, Z, channels) images')
    if data.ndim == 2:
        data = data[..., None]
    canon = nib.as_closest_canonical(nib.Nifti1Image(data, img.affine))
    arr = np.array(canon.dataobj)  # a copy we own, C-contiguous (reorienting leaves negative strides)
    spatial, chans = arr.shape[:3], arr.shape[3:]
    if 1 in spatial:  # a single slice is a 2D image, whatever data.axis says
        plane = [s for s in spatial if s != 1] or [1]
        arr = arr.reshape(plane + [1] * (3 - len(plane)) + list(chans) if chans else plane)
    return arr, canon.affine


def to_source_grid(labels: np.ndarray, path) -> nib.Nifti1Image:
    """labels on the canonical grid that load() reads from the NIfTI file `path` -> a NIfTI image on the file's own
    grid: _read_nifti's reorientation undone, so it has the source's spatial shape, voxel order, affine and header
    basics (units, codes), overlays it 1:1 in ITK-SNAP / 3D Slicer and pairs with its mask voxel for voxel."""
    src = nib.load(path)
    ornt = nib.io_orientation(src.affine)                       # source axis i -> RAS axis ornt[i, 0]
    shape = (tuple(src.shape[:3]) + (1,))[:3]                   # a 2D source is one slice, as _read_nifti reads it
    canonical = [0, 0, 0]
    for i, (axis, _) in enumerate(ornt):
        canonical[int(axis)] = shape[i]
    to_source = nib.orientations.ornt_transform(nib.orientations.axcodes2ornt('RAS'), ornt)
    back = nib.orientations.apply_orientation(labels.reshape(canonical), to_source)
    header = src.header.copy()
    header.set_data_dtype(labels.dtype)
    header['cal_min'] = header['cal_max'] = 0                   # a viewer scales labels from their own range
    return type(src)(back.reshape(src.shape[:3]), src.affine, header)


def _is_grey(rgb: np.ndarray) -> bool:
    return np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2])


def _colour(rgb: np.ndarray, colour: bool) -> np.ndarray:
    """(H, W, 3) uint8 RGB -> (H, W, 1, 3) (channels_of) with colour, else grey (H, W) as PIL 'L' (ITU-R 601-2 luma).
    Equal channels are grey either way (grey scans saved as RGB)."""
    if _is_grey(rgb):
        return rgb[..., 0].copy()
    return rgb[:, :, None].copy() if colour else np.array(Image.fromarray(rgb).convert('L'))


def _read_page(im, path: Path, mask: bool, colour: bool):
    """One page of an open PIL image."""
    if mask and im.mode in ('RGB', 'RGBA', 'LA', 'CMYK', 'YCbCr'):
        rgb = np.asarray(im.convert('RGB'))
        if not _is_grey(rgb):
            raise DataError(f'{path}: colour mask; masks must hold one class index per pixel')
        return rgb[..., 0].copy()
    if not mask and im.mode in ('RGB', 'RGBA', 'CMYK', 'YCbCr', 'P'):
        return _colour(np.asarray(im.convert('RGB')), colour) if colour else np.array(im.convert('L'))
    if not mask and im.mode in ('LA', '1'):
        im = im.convert('L')
    arr = np.array(im)  # masks: 'P' gives the palette indices, which are the classes
    return arr.astype(np.uint8) if mask and arr.dtype == bool else arr


def _read_2d(path: Path, mask: bool, colour: bool):
    """A 2D image file; a multi-page one (TIFF) is a volume (H, W, pages), each page a slice along axis 2."""
    if mask and path.suffix.lower() in ('.jpg', '.jpeg'):
        raise DataError(f'{path}: JPEG masks change label values (lossy); save masks as PNG or NIfTI')
    with Image.open(path) as im:
        pages = []
        for i in range(getattr(im, 'n_frames', 1)):
            im.seek(i)
            pages.append(_read_page(im, path, mask, colour))
    shapes = sorted({p.shape for p in pages})
    if len(shapes) > 1:
        raise DataError(f'{path}: its {len(pages)} pages differ in size or colour {shapes}; a multi-page file is read '
                        f'as a volume, one page per slice, so every page must have one size and one colour mode')
    return pages[0] if len(pages) == 1 else np.stack(pages, 2) if pages[0].ndim == 2 else np.concatenate(pages, 2)


def _read(path: Path, mask: bool, colour: bool):
    """-> (array, affine or None). Binary 8-bit masks stored as 0/255 (BUSI, most PNG tools) become 0/1."""
    try:
        arr, affine = _read_nifti(path) if is_nifti(path) else (_read_2d(path, mask, colour), None)
    except DataError:
        raise
    except Exception as e:  # nibabel/PIL/zlib raise many types for truncated or corrupt files
        raise DataError(f'{path}: unreadable or truncated file ({type(e).__name__}: {e})') from None
    if mask and arr.dtype == np.uint8 and arr.max() == 255 and np.isin(arr, (0, 255)).all():
        arr = (arr // 255).astype(np.uint8)
    return arr, affine


def in_npz(path: Path) -> bool:
    """True for one image inside a MedMNIST file, named <file>.npz/<split>_images/<index> as zipfile.Path names a
    member: the cases of data.layout medmnist, read from memory."""
    return path.parent.parent.suffix == '.npz'


def read_npz(path: Path) -> dict:
    """Every array of an .npz, read once per process and file version (np.load decompresses a member on each access)."""
    stat = path.stat()
    return _read_npz(path, stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=1)
def _read_npz(path, mtime_ns, size):
    try:
        f = np.load(path)
    except Exception as e:  # not a zip, a pickle, a truncated download
        raise DataError(f'{path}: unreadable .npz ({type(e).__name__}: {e})') from None
    if not isinstance(f, np.lib.npyio.NpzFile):  # a plain .npy file under an .npz name
        raise DataError(f'{path}: one array ({type(f).__name__}), not an .npz archive of named arrays')
    arrays = {}
    with f:
        for key in f.files:
            try:
                arrays[key] = f[key]  # a member that is no .npy file comes back as its raw bytes
            except Exception as e:  # an object array (pickled Python objects), a truncated member
                raise DataError(f'{path}: member {key!r} unreadable ({type(e).__name__}: {e}); save numeric arrays '
                                f'with np.savez') from None
            if not isinstance(arrays[key], np.ndarray):
                raise DataError(f'{path}: member {key!r} is {type(arrays[key]).__name__}, not a NumPy array; save '
                                f'numeric arrays with np.savez')
    return arrays


def _npz_channels_last(shape) -> bool:
    """One MedMNIST image's shape: (H, W, c) with c <= 4 holds channels (the medmnist package's (28, 28, 3) RGB);
    any other 3D shape is a volume (D, H, W)."""
    return len(shape) == 3 and shape[-1] <= 4


def _read_npz_image(path: Path, colour: bool):
    """A MedMNIST image as the medmnist package presents it: grey (H, W) ((H, W, 1) too), RGB (H, W, 3) (as _colour
    gives it: (H, W, 1, 3), or grey as PIL 'L'); a volume (D, H, W) becomes (H, W, D), so data.axis 2 cuts it into
    its D slices, as it cuts a NIfTI volume along z."""
    arr = read_npz(path.parent.parent)[path.parent.name][int(path.name)]
    if _npz_channels_last(arr.shape):
        return arr[..., 0] if arr.shape[-1] == 1 else _colour(arr, colour)
    return np.moveaxis(arr, 0, -1) if arr.ndim == 3 else arr


def load(path, mask=False, colour=False):
    """(array, canonical affine or None) of an image or mask file, decoded now (SliceDataset keeps its own cache).
    A colour image is grey (PIL 'L') unless `colour`, which keeps its RGB as (H, W, 1, 3); a 4D NIfTI keeps its
    channels (X, Y, Z, C) either way (channels_of)."""
    path = Path(path)
    if in_npz(path):
        return _read_npz_image(path, colour), None
    if not path.is_file():
        raise DataError(f'{path}: file not found')
    return _read(path, mask, colour)


def load_image(case: Case, colour=False):
    """(image, affine) of a case with all its channels: its file (load), with case.extra_channels (nnU-Net channel
    files, each one grey channel) stacked after it as channels, (X, Y, Z, C) or (H, W, 1, C)."""
    if not case.extra_channels:
        return load(case.image, colour=colour)
    chans, affines = zip(*(load(p) for p in (case.image, *case.extra_channels)))
    for path, arr, other in zip(case.extra_channels, chans[1:], affines[1:]):
        if chans[0].ndim > 3 or arr.shape != chans[0].shape or (
                affines[0] is not None and not np.allclose(affines[0], other, atol=1e-3)):
            raise DataError(f'{path}: channel file of shape {arr.shape} is not on the grid of {case.image} (shape '
                            f'{chans[0].shape}); the channel files of a case are one grey image each, of one shape '
                            f'and affine')
    return np.stack([c[:, :, None] if c.ndim == 2 else c for c in chans], axis=-1), affines[0]


def load_mask(case: Case, read=load) -> np.ndarray:
    """The case's mask, its extra masks merged by maximum; `read` is `load` or a caching equivalent."""
    m = read(case.mask, mask=True)[0]
    for extra in case.extra_masks:
        m = np.maximum(m, read(extra, mask=True)[0])
    return m


class _LRU:
    """Decoded arrays by key, least recently used dropped beyond `limit` bytes."""

    def __init__(self, limit):
        self.items, self.nbytes, self.limit = OrderedDict(), 0, limit

    def get(self, key, make):
        if key in self.items:
            self.items.move_to_end(key)
            return self.items[key]
        value = self.items[key] = make()
        self.nbytes += value[0].nbytes
        while self.nbytes > self.limit and len(self.items) > 1:
            old = self.items.popitem(last=False)[1]
            self.nbytes -= old[0].nbytes
        return value


# ----------------------------------------------------------------------------------------------------------------
# Intensities: every mode is a linear map of [lo, hi] onto [0, 1] with clipping
# ----------------------------------------------------------------------------------------------------------------

def modes(mode) -> list[str]:
    """The modes of a resolved data.intensity: one for every channel, or a list of one per channel."""
    return mode if isinstance(mode, list) else [mode]


def channel_mode(mode, channel: int) -> str:
    """One input channel's resolved intensity mode: data.intensity is one mode for every channel, or a list of one
    per channel (CT with other sequences: window on the CT channels, percentile on the others)."""
    return mode[channel] if isinstance(mode, list) else mode


def intensity_range(arr: np.ndarray, dcfg: dict, channel=0) -> tuple[float, float]:
    """[lo, hi] of one channel's values mapped to [0, 1]: the CT window in HU, per-image percentiles, or the stored
    range (integers over their dtype's maximum, floats already in [0, 1]). The mode is resolved (resolve_intensity)."""
    mode = channel_mode(dcfg['intensity'], channel)
    if mode == 'window':
        lo, hi = dcfg['window']
    elif mode == 'percentile':
        lo, hi = np.percentile(arr, dcfg['percentile'])
    else:  # none
        lo, hi = 0.0, (np.iinfo(arr.dtype).max if np.issubdtype(arr.dtype, np.integer) else 1.0)
    return float(lo), float(max(hi, lo + 1e-6))  # a constant image maps to 0, not to NaN


def to_unit(x: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    return ((x - lo) / (hi - lo)).clamp_(0.0, 1.0)


def normalize(x: torch.Tensor, mean, std) -> torch.Tensor:
    """(C, H, W) in [0, 1] -> (x - mean) / std per channel; a 1-value mean/std applies to every channel."""
    mean = torch.as_tensor(mean, dtype=x.dtype).view(-1, 1, 1)
    std = torch.as_tensor(std, dtype=x.dtype).view(-1, 1, 1)
    return (x - mean) / std


# ----------------------------------------------------------------------------------------------------------------
# Layout readers: each returns (cases, names) with names = {'class_names': seg names or None, 'label_names': ...};
# msd and csv add 'modalities', each input channel's in dataset.json or None (data.intensity auto reads it)
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


def _modalities_json(path: Path):
    """Each input channel's modality in channel order, from a dataset.json (MSD "modality": {"0": "FLAIR", "1": "T1w"},
    nnU-Net v2 "channel_names"), or None when there is no file or no such entry."""
    try:
        js = json.loads(path.read_text())
        channels = js.get('modality') or js['channel_names']
        return [str(channels[str(i)]) for i in range(len(channels))]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def _listing(d: Path) -> dict:
    """{stem: file} of the images in a folder; two files of one stem (c.nii beside c.nii.gz) are refused. The MSD
    archives carry macOS '._*' resource files beside every volume: not images."""
    found = {}
    for p in sorted(d.iterdir()):
        if p.name.startswith('.') or not (is_nifti(p) or p.suffix.lower() in IMAGE_EXTS):
            continue
        if _stem(p) in found:
            raise DataError(f'{found[_stem(p)]} and {p}: two files for case {_stem(p)}; keep one of them')
        found[_stem(p)] = p
    return found


def read_msd(root: Path):
    """Medical Segmentation Decathlon / nnU-Net: imagesTr/<id>.nii.gz (one file; a 4D one holds the channels) or the
    nnU-Net channel files <id>_0000.nii.gz, <id>_0001.nii.gz ..., and labelsTr/<id>.nii.gz."""
    images_dir, labels_dir = root / 'imagesTr', root / 'labelsTr'
    for d in (images_dir, labels_dir):
        if not d.is_dir():
            raise DataError(f'{d}: folder not found (data.layout msd expects imagesTr/ and labelsTr/ in data.root)')
    images, labels = _listing(images_dir), _listing(labels_dir)
    channels = {}  # case id -> {channel index: file}
    for stem, image in images.items():
        suffix = re.fullmatch(r'(.+)_(\d{4})', stem)
        if stem not in labels and suffix:  # nnU-Net v2 channel suffix
            channels.setdefault(suffix.group(1), {})[int(suffix.group(2))] = image
        else:
            channels.setdefault(stem, {})[0] = image
    cases = []
    for cid, files in channels.items():
        if sorted(files) != list(range(len(files))):
            gap = min(set(range(len(files) + 1)) - set(files))
            raise DataError(f'{files[max(files)]}: channel files of case {cid} are {sorted(files)}, without '
                            f'{cid}_{gap:04d}; nnU-Net numbers the channels 0000, 0001, ... without gaps')
        if cid not in labels:
            raise DataError(f'{files[0]}: no mask {labels_dir / (cid + ".nii.gz")}')
        cases.append(Case(cid, files[0], labels[cid], None,
                          extra_channels=tuple(files[k] for k in range(1, len(files)))))
    orphans = sorted(set(labels) - {c.id for c in cases})
    if orphans:
        raise DataError(f'{labels[orphans[0]]}: mask without an image in {images_dir}')
    js = root / 'dataset.json'
    return cases, {'class_names': _label_names_json(js) if js.exists() else None, 'label_names': None,
                   'modalities': _modalities_json(js)}


def read_csv(path: Path):
    """Manifest with columns image and label and/or mask (paths relative to the CSV), optional split and case."""
    if not path.is_file():
        raise DataError(f'{path}: manifest not found (data.root for data.layout csv is the CSV file)')
    try:
        with open(path, newline='', encoding='utf-8-sig') as f:  # -sig: spreadsheet programs add a BOM
            reader = csv.DictReader(f)
            rows = list(reader)
            columns = [c.strip() for c in reader.fieldnames or []]
    except UnicodeDecodeError as e:
        raise DataError(f'{path}: not UTF-8 text ({e.reason} at byte {e.start}); save the manifest as UTF-8 '
                        f'(in spreadsheet programs: CSV UTF-8)') from None
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
        if all(re.fullmatch(r'-?\d+', v) for v in raw):
            labels = [int(v) for v in raw]
            if min(labels) < 0:
                raise DataError(f'{path} line {labels.index(min(labels)) + 2}: label {min(labels)} is negative; '
                                f'labels are class indices 0, 1, ... or class names (drop unlabelled rows)')
        else:  # class names: indices in sorted order
            label_names = sorted(set(raw))
            labels = [label_names.index(v) for v in raw]
    base = path.parent
    images = [base / row['image'] for row in rows]
    stems = [_stem(p) for p in images]
    unique_stems = len(set(stems)) == len(stems)
    cases, seen, mask_of = [], set(), {}   # mask_of: mask -> (line, case) of the first row listing it
    for n, (row, image) in enumerate(zip(rows, images), start=2):
        if image in seen:
            raise DataError(f'{path} line {n}: {image} is listed twice')
        seen.add(image)
        cid = row.get('case') or (_stem(image) if unique_stems else row['image'].rsplit('.nii', 1)[0])
        mask = base / row['mask'] if 'mask' in columns else None
        if mask is not None:  # one case's images (co-registered sequences) may share a mask; two cases may not
            first, other = mask_of.setdefault(mask, (n, cid))
            if other != cid:
                raise DataError(f'{path} lines {first} and {n}: one mask {mask} for cases {other} and {cid}; give '
                                f'each image its own mask, or both rows one "case" value if they are images of one '
                                f'patient')
        cases.append(Case(cid, image, mask, labels[n - 2] if 'label' in columns else None, row.get('split')))
    js = path.parent / 'dataset.json'  # optional segmentation class names, as in the msd layout
    return cases, {'class_names': _label_names_json(js) if js.exists() and 'mask' in columns else None,
                   'label_names': label_names, 'modalities': _modalities_json(js)}


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
        images, masks, stems = [], {}, {}   # stems: file stem -> file, so b0.png + b0.jpg is refused, not paired
        for p in sorted((root / cls).iterdir()):
            if p.name.startswith('.'):
                continue
            if p.is_dir() or p.suffix.lower() not in IMAGE_EXTS:
                raise DataError(f'{p}: not a 2D image ({", ".join(IMAGE_EXTS)}); the folder layout holds only '
                                f'images and their masks')
            m = mask_re.fullmatch(_stem(p)) if mask_re else None
            if _stem(p) in stems:
                raise DataError(f'{stems[_stem(p)]} and {p}: two {"masks" if m else "images"} named {_stem(p)}; '
                                f'keep one')
            stems[_stem(p)] = p
            if m:
                masks.setdefault(m.group(1), []).append(p)
            else:
                images.append(p)
        for p in images:
            found = sorted(masks.pop(_stem(p), []), key=lambda q: (len(q.name), q.name))  # x_mask before x_mask_1
            any_mask |= bool(found)
            cases.append(Case(f'{cls}/{_stem(p)}', p, found[0] if found else None, label,
                              extra_masks=tuple(found[1:])))
        if not images and not masks:  # an empty class could be neither learned nor scored
            raise DataError(f'{root / cls}: class folder without images; add its images or remove the folder')
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


def read_medmnist(path: Path):
    """MedMNIST v2 .npz: <split>_images uint8 (N, H, W) or (N, H, W, 1) grey, (N, H, W, 3) RGB or (N, D, H, W) 3D, and
    <split>_labels (N, 1) for split train / val / test. Each image is a case in the file's own split, its path naming
    it in the file (in_npz)."""
    if not path.is_file():
        raise DataError(f'{path}: file not found (data.root for data.layout medmnist is the .npz file)')
    arrays, cases = read_npz(path), []
    for split in SPLITS:
        for key in (f'{split}_images', f'{split}_labels'):
            if key not in arrays:
                raise DataError(f'{path}: no {key!r} array (it has {sorted(arrays)}); a MedMNIST file holds '
                                f'train/val/test_images and train/val/test_labels')
        images, labels = arrays[f'{split}_images'], arrays[f'{split}_labels']
        if (images.ndim not in (3, 4) or images.dtype != np.uint8 or
                _npz_channels_last(images.shape[1:]) and images.shape[-1] not in (1, 3)):
            alpha = ' (RGBA: keep the colour, images[..., :3])' if images.shape[-1] == 4 else ''
            raise DataError(f'{path}: {split}_images has shape {images.shape} and dtype {images.dtype}; expected uint8 '
                            f'(N, H, W) or (N, H, W, 1) grey, (N, H, W, 3) RGB or (N, D, H, W) 3D{alpha}')
        if labels.ndim != 2 or len(labels) != len(images):
            raise DataError(f'{path}: {split}_labels has shape {labels.shape} for {len(images)} {split}_images; '
                            f'expected ({len(images)}, 1)')
        if labels.shape[1] != 1:
            raise DataError(f'{path}: {split}_labels has {labels.shape[1]} labels per image (multi-label, as '
                            f'ChestMNIST); tpp classifies one class per image, labels (N, 1)')
        if labels.dtype.kind not in 'biuf':
            raise DataError(f'{path}: {split}_labels has dtype {labels.dtype}; labels are class indices 0, 1, ...')
        whole = np.isfinite(labels) & (labels == np.round(labels)) if labels.dtype.kind == 'f' else True
        wrong = np.flatnonzero(~(whole & (labels >= 0))[:, 0])  # a float label must not be truncated to a class
        if len(wrong):
            raise DataError(f'{path}: {split}_labels[{wrong[0]}] is {labels[wrong[0], 0]:g}; labels are class '
                            f'indices 0, 1, ... (non-negative integers)')
        cases += [Case(f'{split}_{i}', path / f'{split}_images' / str(i), None, int(label), split)
                  for i, label in enumerate(labels[:, 0])]
    return cases, {'class_names': None, 'label_names': None}


# ----------------------------------------------------------------------------------------------------------------
# prepare: resolve the layout, then validate every case before training
# ----------------------------------------------------------------------------------------------------------------

def resolve_intensity(mode: str, cases: list[Case], names: dict) -> tuple[str, str]:
    """(mode, what to log): an explicit data.intensity as it is; auto becomes none for MedMNIST arrays (uint8 / 255),
    percentile for 2D image files and for NIfTI whose dataset.json names a channel of another modality than CT (MRI,
    T2, FLAIR), and window for the other NIfTI volumes, read as CT in Hounsfield units. The mode applies to each
    channel on its own (percentiles per sequence). cases, names: from read_cases."""
    if mode != 'auto':
        return mode, mode
    modalities = names.get('modalities')
    if all(in_npz(c.image) for c in cases):
        mode, why = 'none', 'MedMNIST arrays'
    elif not all(is_nifti(c.image) for c in cases):
        mode, why = 'percentile', '2D image files'
    elif modalities and 'CT' in (ct := [m.upper() for m in modalities]) and any(m != 'CT' for m in ct):
        mode = ['window' if m == 'CT' else 'percentile' for m in ct]
        why = f"NIfTI volumes, dataset.json modality {', '.join(modalities)}: window on the CT channels"
    elif modalities and any(m.upper() != 'CT' for m in modalities):
        mode, why = 'percentile', f"NIfTI volumes, dataset.json modality {', '.join(modalities)}"
    else:
        mode, why = 'window', f"NIfTI volumes, {'dataset.json modality CT' if modalities else 'read as CT'}"
    return mode, f'auto -> {mode} ({why})'


# The readers of the layouts with a data.root: reader(root, dcfg) -> (cases, names), as the layout readers above.
READERS = {'msd': lambda root, dcfg: read_msd(root), 'csv': lambda root, dcfg: read_csv(root),
           'folder': lambda root, dcfg: read_folder(root, dcfg['mask_suffix']),
           'medmnist': lambda root, dcfg: read_medmnist(root)}


def read_cases(dcfg: dict, cache_dir) -> tuple[list[Case], dict]:
    """The cases of data.layout and their names (layout readers), files listed but not decoded; the synthetic sets
    (of data.site) are written to cache_dir on first use."""
    layout, root = dcfg['layout'], dcfg.get('root')
    if layout in SYNTHETIC_LAYOUTS:
        root = synthetic.synthetic_root(layout.removeprefix('synthetic_'), cache_dir, site=dcfg['site'])
    if layout in ('synthetic_ct', 'synthetic_mri'):
        cases, names = read_csv(root / 'manifest.csv')
    elif layout == 'synthetic_us':
        cases, names = read_folder(root, '_mask')
        names['class_names'] = ['background', 'lesion']
    else:   # a layout of READERS: config.load_config makes sure data.root is set
        root = Path(root).expanduser()
        cases, names = READERS[layout](root, dcfg)
    if not cases:
        raise DataError(f'{root}: no cases found for data.layout {layout}')
    names['root'] = root.name if layout in SYNTHETIC_LAYOUTS else str(root.resolve())   # where the cases are from
    return cases, names


def source_name(dcfg: dict) -> str:
    """The data set a data config names, for messages: its layout and root, or a built-in layout's site."""
    where = f"site {dcfg['site']}" if dcfg['layout'] in SYNTHETIC_LAYOUTS else dcfg['root']
    return f"data.layout {dcfg['layout']} ({where})"


def external_config(dcfg: dict) -> dict | None:
    """The data config of the external test set (data.external_root / external_layout / external_site: the data
    keys of a second data set, the other keys shared; config.load_config checked them), or None when neither is set.
    Called before the stage puts the main data's resolved data.intensity into dcfg, so the external set resolves its
    own auto."""
    if dcfg['external_root'] is None and dcfg['external_layout'] is None:
        return None
    layout = dcfg['external_layout'] or dcfg['layout']
    site = dcfg['external_site'] if layout in SYNTHETIC_LAYOUTS else dcfg['site']
    return {**dcfg, 'layout': layout, 'root': dcfg['external_root'], 'site': site}


def resolve_in_chans(configured, chans: int, colour: bool) -> tuple[int, str]:
    """(model.in_chans, what to log) from the data's channels per image (validate: chans, colour for RGB images). null
    follows the data; a fixed value wins where the data can be read so (grey repeats to any count, colour becomes grey
    for 1), else a DataError naming the key."""
    kind = 'colour images' if colour else f'{chans} channels per image' if chans > 1 else 'grey images'
    if configured is None:
        return chans, f'null -> {chans} ({kind})'
    if configured == chans:
        return chans, f'{chans} ({kind})'
    if chans == 1:
        return configured, f'{configured} (grey images repeated to {configured} channels)'
    if colour and configured == 1:
        return 1, "1: colour images converted to grey (ITU-R 601-2 luma, as PIL 'L')"
    raise DataError(f"model.in_chans: {configured} does not fit the data's {kind}; set it to null (follows the "
                    f"data) or {chans}{' (or 1: grey)' if colour else ''}")


def prepare(dcfg: dict, cache_dir, task=None, in_chans=None) -> tuple[list[Case], dict]:
    """Resolve data.layout (read_cases) and data.intensity, then validate every case; with a task ('classification' /
    'segmentation') also refuse data with one class for it. Returns (cases, info) with info keys num_classes_seg
    (incl. background) or None, num_classes_cls or None, intensity, the line to log about data.intensity, in_chans,
    the model's input channels (model.in_chans `in_chans` resolved from the data: resolve_in_chans), channels, the
    line to log about it, modes, data.intensity resolved (auto -> a mode or a list of modes: resolve_intensity),
    warnings (validate's, for the stage to log: warning_lines) and data, {'layout', 'root'} with the root resolved (a
    synthetic set's folder name), which describe() completes for the targets' meta. dcfg is left as it is: the stage
    puts info['modes'] and info['in_chans'] into its config, so SliceDataset gets the modes and the run's config.yaml
    (resume compares it) records what the data resolved to."""
    cases, names = read_cases(dcfg, cache_dir)
    mode, intensity = resolve_intensity(dcfg['intensity'], cases, names)
    checked = validate(cases, names, {**dcfg, 'intensity': mode}, task)
    chans, line = resolve_in_chans(in_chans, checked.pop('chans'), checked.pop('colour'))
    if isinstance(mode, list) and len(mode) != chans:
        raise DataError(f'data.intensity: {len(mode)} modes {mode} for {chans} input channels ({line}); give one mode '
                        f'for every channel, or one for all')
    for key in ('mean', 'std'):   # the schema checks the lengths against a fixed in_chans; this, the resolved one
        if len(dcfg[key]) not in (1, chans):
            raise DataError(f'data.{key}: {len(dcfg[key])} values for {chans} input channels ({line}); give 1 or '
                            f'{chans}')
    return cases, {**checked, 'intensity': intensity, 'modes': mode, 'in_chans': chans, 'channels': line,
                   'data': {'layout': dcfg['layout'], 'root': names['root']}}


def fingerprint(cases: list[Case]) -> str:
    """First 12 hex digits of the sha256 of the sorted case ids and image file names: the same cases give the same
    fingerprint wherever their folder lies, another split or data set another one."""
    listing = '\n'.join(sorted(f'{c.id}\t{c.image.name}' for c in cases))
    return hashlib.sha256(listing.encode()).hexdigest()[:12]


def describe(info: dict, cases: list[Case]) -> dict:
    """The data a stage trains on, as the targets' meta records it and stage 2 compares it: {'layout', 'root',
    'fingerprint'} of `cases` (the split's training cases); info from prepare."""
    return {**info['data'], 'fingerprint': fingerprint(cases)}


def warning_lines(warnings: list[str], first=5) -> list[str]:
    """The log lines of prepare's warnings: the first few, then how many more (one per case can be thousands)."""
    more = [f'... and {len(warnings) - first} more data warnings'] if len(warnings) > first else []
    return [f'warning: {w}' for w in warnings[:first] + more]


def _first_five(values: list) -> str:
    """The first five values, then '...': the missing classes a message names."""
    return ', '.join(map(str, values[:5])) + (', ...' if len(values) > 5 else '')


def _window_warning(case: Case, image: np.ndarray, window) -> str | None:
    """Why a CT image (data.intensity window) may not be in Hounsfield units, or None: no voxel below 0, or almost
    every voxel outside the window."""
    low, (lo, hi) = image.min(), window
    where = f'{case.image} (case {case.id})'
    if low >= 0:
        return (f'{where}: no voxel below 0 (min {low:g}), but data.intensity window reads Hounsfield units, where '
                f'air is -1000: is an HU offset missing (CT stored as HU + 1024)? Set the rescale slope/intercept in '
                f'the NIfTI header (scl_inter -1024), subtract 1024 from the voxels, or set data.intensity: percentile')
    clipped = np.count_nonzero((image < lo) | (image > hi)) / image.size
    if clipped > 0.99:
        return (f'{where}: {100 * clipped:.1f}% of the voxels lie outside data.window {[lo, hi]} and are clipped; '
                f'check data.window (Hounsfield units) or set data.intensity: percentile')
    return None


def validate(cases: list[Case], names: dict, dcfg: dict, task=None) -> dict:
    """Decode every file once and check it; the first problem raises a DataError naming the file. Returns the class
    counts: names from dataset.json / class folders / label names when there are some, else the largest value + 1;
    chans, the channels per image (the most: grey images go with colour ones), and colour, whether they are RGB
    colour (2D image files, MedMNIST) rather than sequences (4D NIfTI, nnU-Net channel files); and the warnings:
    images that are constant or whose intensities look wrong for data.intensity."""
    windowed = lambda i: channel_mode(dcfg['intensity'], i) == 'window'   # channel i is CT in Hounsfield units
    if 'window' in modes(dcfg['intensity']):
        flat = [c.image for c in cases if not is_nifti(c.image)]
        if flat:
            raise DataError(f'{flat[0]}: data.intensity window expects CT in Hounsfield units (NIfTI), not a 2D '
                            f'image file or MedMNIST array; set data.intensity: auto (the default), percentile or none')
    configured = dcfg.get('num_classes')
    seg_k = configured or (len(names['class_names']) if names['class_names'] else None)
    seen, top = set(), None  # mask values over all masks, and the mask holding the largest
    warnings, constant = [], 0   # constant: images with every voxel equal
    first = {}  # (channels, colour) -> the first image that has them
    for c in cases:
        if not (c.image.exists() or in_npz(c.image)):
            raise DataError(f'{c.image}: image file not found (case {c.id})')
        image, affine = load_image(c, colour=True)
        if image.dtype.kind == 'f' and not np.isfinite(image).all():
            raise DataError(f'{c.image}: {(~np.isfinite(image)).sum()} NaN/Inf voxels; replace them (for example '
                            f'with the background value) or leave the case out')
        chans = channels_of(image)
        ct = [ch for i, ch in enumerate(chans) if windowed(i)]
        if image.min() == image.max():
            constant += 1
            warnings.append(f'{c.image} (case {c.id}): every voxel is {image.flat[0]:g}: a constant image teaches '
                            f'nothing; leave the case out')
        elif ct and (warning := _window_warning(c, np.stack(ct), dcfg['window'])):
            warnings.append(warning)
        first.setdefault((len(chans), len(chans) > 1 and not (is_nifti(c.image) or c.extra_channels)), c.image)
        shape = chans[0].shape
        if c.mask is None:
            continue
        for path in (c.mask, *c.extra_masks):
            if not path.exists():
                raise DataError(f'{path}: mask file not found (image {c.image})')
            mask, mask_affine = load(path, mask=True)
            if mask.shape != shape:
                raise DataError(f'{path}: mask shape {mask.shape} differs from image {c.image} shape {shape} '
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
            if top is None or values[-1] > max(seen):
                top = path
            seen.update(values.astype(int).tolist())
    if seen and not seg_k:  # classes inferred from the values: 0/128 masks must not become 129 classes
        unused = sorted(set(range(max(seen))) - seen)
        if unused:
            raise DataError(f'{top}: mask value {max(seen)}, but no mask holds {_first_five(unused)}; masks hold class '
                            f'indices 0..K-1 (0/255 is read as 0/1): save them so (a binary 0/c mask as mask > 0) or, '
                            f'if classes really are absent, set data.num_classes')
    if task == 'segmentation' and seen == {0}:
        raise DataError(f'{cases[0].mask} and the others: all {len(cases)} masks hold only background (0); '
                        f'segmentation needs a foreground class (check the masks or data.mask_suffix)')
    labelled = [c for c in cases if c.label is not None]
    cls_k = None
    if labelled:
        cls_k = configured or (len(names['label_names']) if names['label_names'] else
                               max(c.label for c in labelled) + 1)
        for c in labelled:
            if not 0 <= c.label < cls_k:
                raise DataError(f'{c.image}: label {c.label} outside the {cls_k} classes 0..{cls_k - 1} '
                                f'(data.num_classes)')
        unused = sorted(set(range(cls_k)) - {c.label for c in labelled})
        if unused and not (configured or names['label_names']):  # a count inferred from {0, 1, 255} is not 256
            top = max(labelled, key=lambda c: c.label)
            raise DataError(f'{top.image} (case {top.id}): label {top.label}, but no case has label '
                            f'{_first_five(unused)}; labels are class indices 0..K-1: number the classes so or, if '
                            f'classes really are absent, set data.num_classes')
        if task == 'classification' and len({c.label for c in labelled}) == 1:
            k = labelled[0].label
            name = f" ({names['label_names'][k]})" if names['label_names'] else ''
            raise DataError(f'{labelled[0].image} and the others: all {len(labelled)} labelled images have class '
                            f'{k}{name}; classification needs two classes or more (check the labels in data.root)')
    if constant == len(cases):
        raise DataError(f'{cases[0].image} and the others: all {len(cases)} images are constant (every voxel equal, '
                        f'as an all-zero file): nothing to train on; check the files in data.root')
    seg_k = seg_k or (max(max(seen) + 1, 2) if seen else None)
    return {'num_classes_seg': seg_k, 'num_classes_cls': cls_k, 'warnings': warnings,
            **_check_channels(first, names.get('modalities'))}


def _check_channels(first: dict, modalities) -> dict:
    """{'chans', 'colour'} of the data from validate's {(channels, colour): first image}: grey and colour images may
    mix (grey repeats to 3 channels); sequence images (not colour) must all have one count, dataset.json's if it
    lists the channels."""
    (chans, colour), path = max(first.items())
    if len(first) > 1 and any(n > 1 and not col for n, col in first):
        ((n, _), p), ((m, _), q) = sorted(first.items())[:2]
        raise DataError(f'{q}: {m} channel(s), but {p} has {n}; every image of a multi-channel (multi-sequence) '
                        f'data set needs the same channels')
    if modalities and not colour and chans != len(modalities):
        raise DataError(f'{path}: {chans} channel(s), but dataset.json lists {len(modalities)} '
                        f'({", ".join(modalities)})')
    return {'chans': chans, 'colour': colour}


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
        n_test, n_val = (max(1, round(len(ids) * dcfg[k])) for k in ('test_fraction', 'val_fraction'))
        if n_test + n_val >= len(ids):
            raise DataError(f"data.val_fraction + data.test_fraction: {dcfg['val_fraction']} + "
                            f"{dcfg['test_fraction']} of {len(ids)} cases leaves no training case")
        groups = {'test': set(order[:n_test]), 'val': set(order[n_test:n_test + n_val]),
                  'train': set(order[n_test + n_val:])}
    train_order = _stratified_order(sorted(groups['train']), labels, dcfg['label_seed'])
    groups['labelled'] = set(train_order[:max(1, round(len(train_order) * dcfg['label_fraction']))])
    return {s: [c for c in cases if c.id in g] for s, g in groups.items()}


# ----------------------------------------------------------------------------------------------------------------
# Slices: resize, augmentation, normalisation
# ----------------------------------------------------------------------------------------------------------------

def take_slice(arr: np.ndarray, axis: int, index: int) -> np.ndarray:
    """2D slice (a view) of a canonical volume along `axis`; the image itself for 2D. A view, not np.take, which
    copies the slice out of the Fortran-ordered arrays NIfTI gives."""
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


def random_views(images: torch.Tensor, dcfg: dict, crop_scale, size=None) -> torch.Tensor:
    """images (B, C, S, S), normalised -> one random view of each, (B, C, size, size) (size None: S): the training
    augmentation (data.augment, with this crop_scale) drawn per image, then resized (antialiased), for DINO's global
    and local crops. Outside the image is black, as in SliceDataset."""
    aug = {**dcfg['augment'], 'crop_scale': crop_scale}
    theta = torch.cat([random_affine(aug) for _ in range(len(images))]).to(images.device)  # (B, 2, 3)
    mean, std = mean_std(images, dcfg)
    black = -mean / std  # 0 before normalisation
    return resize(warp(images - black, None, theta)[0], None, size or images.shape[-1])[0] + black


def mean_std(images, dcfg):
    """data.mean and data.std as (1, C, 1, 1) tensors on the images' device."""
    return (torch.tensor(dcfg[k], device=images.device).view(1, -1, 1, 1) for k in ('mean', 'std'))


def unnormalize(images, dcfg):
    """images (B, C, H, W), normalised -> their [0, 1] intensities: x * std + mean, the inverse of normalize."""
    mean, std = mean_std(images, dcfg)
    return images * std + mean


def grey_photometric(images: torch.Tensor, dcfg: dict, blur: float, solarize: float, sigma,
                     jitter=0.8) -> torch.Tensor:
    """DINO's photometric augmentation for grey images, on a normalised batch (B, C, H, W) -> the same shape. Each
    image independently: with probability `jitter` (DINO's 0.8) brightness, then contrast, jitter (factors uniform
    in [0.6, 1.4], as DINO's ColorJitter(0.4, 0.4), which draws the order at random; clipped to [0, 1]); with
    probability `blur` a Gaussian blur of sigma uniform in `sigma` (pixels); with probability `solarize`
    solarisation (values >= 0.5 inverted, as PIL's). Saturation and hue jitter leave grey images as they are. Every
    draw comes from torch's global generator, so a seed (and a resumed run) repeats them."""
    mean, std = mean_std(images, dcfg)
    u = lambda lo, hi: (lo + (hi - lo) * torch.rand(len(images))).to(images.device).view(-1, 1, 1, 1)   # (B, 1, 1, 1)
    jittered, brightness, contrast = u(0, 1) < jitter, u(0.6, 1.4), u(0.6, 1.4)
    blurred, sigmas, solarized = u(0, 1) < blur, u(*sigma), u(0, 1) < solarize
    x = unnormalize(images, dcfg)                                                       # [0, 1] intensities
    bright = (x * brightness).clamp(0, 1)
    grey = bright.mean(dim=(1, 2, 3), keepdim=True)                                     # (B, 1, 1, 1)
    x = torch.where(jittered, (contrast * bright + (1 - contrast) * grey).clamp(0, 1), x)
    x = torch.where(blurred, gaussian_blur(x, sigmas.flatten()), x)
    x = torch.where(solarized & (x >= 0.5), 1 - x, x)
    return (x - mean) / std


def gaussian_blur(images: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """images (B, C, H, W), sigma (B,) pixels -> each image blurred with its own separable Gaussian (reflected
    borders), one grouped convolution per axis; the kernel spans 3 sigma of the widest."""
    B, C, H, W = images.shape
    radius = max(1, math.ceil(3 * sigma.max().item()))
    t = torch.arange(-radius, radius + 1, device=images.device, dtype=images.dtype)   # (k,)
    kernel = torch.exp(-0.5 * (t / sigma.view(B, 1).to(images.dtype)) ** 2)           # (B, k)
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(C, 0)           # (B*C, k), each sums to 1
    x = F.pad(images.reshape(1, B * C, H, W), (radius,) * 4, mode='reflect')
    x = F.conv2d(x, kernel.view(B * C, 1, 1, -1), groups=B * C)                        # along W
    x = F.conv2d(x, kernel.view(B * C, 1, -1, 1), groups=B * C)                        # along H
    return x.view(B, C, H, W)


def resize(image: torch.Tensor, mask: torch.Tensor | None, size: int):
    """image (1, C, H, W) -> (1, C, S, S) antialiased bilinear; mask nearest-exact, which samples the same pixel
    centres as bilinear with align_corners=False (plain 'nearest' is shifted by half a pixel)."""
    if image.shape[-2:] != (size, size):
        image = F.interpolate(image, (size, size), mode='bilinear', antialias=True, align_corners=False)
        if mask is not None:
            mask = F.interpolate(mask, (size, size), mode='nearest-exact')
    return image, mask


class SliceDataset(torch.utils.data.Dataset):
    """2D slices of the cases, in_chans channels each. task: None (images only, stage 1: applies data.skip_empty),
    'classification' (every slice of a volume carries its case label) or 'segmentation'. Items are ordered by case,
    then slice. Grey images repeat to in_chans channels; colour ones are read as grey for in_chans 1; otherwise an
    image's channels must be in_chans. Decoded files stay in the dataset's own cache of data.cache_mb (each
    DataLoader worker has its copy)."""

    def __init__(self, cases, dcfg, img_size, in_chans, task, train):
        if not set(modes(dcfg['intensity'])) <= set(INTENSITIES):    # a bug: auto goes in resolved (prepare's modes)
            raise ValueError(f"data.intensity {dcfg['intensity']!r}: SliceDataset needs modes of {INTENSITIES}")
        self.cases, self.dcfg, self.size, self.in_chans = list(cases), dcfg, img_size, in_chans
        self.task, self.train, self.axis = task, train, dcfg['axis']
        self.files, self.ranges = _LRU(int(dcfg['cache_mb']) * 2 ** 20), {}   # decoded arrays; (lo, hi) per image
        need = {'classification': 'label', 'segmentation': 'mask'}.get(task)
        for c in self.cases:
            if need and getattr(c, need) is None:
                raise DataError(f'{c.image}: no {need} for task {task}')
        self.index, self.skipped = [], 0  # index: (case index, slice index); skipped: near-empty slices dropped
        for ci, c in enumerate(self.cases):
            chans = self.channels(c)
            if len(chans) not in (1, in_chans):
                raise DataError(f'{c.image}: {len(chans)} channels for model.in_chans {in_chans}; set model.in_chans '
                                f'to {len(chans)} or null (follows the data)')
            n = chans[0].shape[self.axis] if chans[0].ndim == 3 else 1
            keep = np.ones(n, bool)
            if task is None and dcfg['skip_empty'] > 0:
                keep = self._body_fraction(c.image, chans) >= dcfg['skip_empty']
                self.skipped += int((~keep).sum())
            self.index += [(ci, s) for s in np.flatnonzero(keep).tolist()]
        if not self.index:
            raise DataError(f'data.skip_empty: {dcfg["skip_empty"]} leaves no slice in {len(self.cases)} cases'
                            if self.cases else 'no cases for this dataset (empty split)')

    def load(self, path, mask=False):
        return self.files.get((str(path), mask), lambda: load(path, mask))

    def channels(self, case) -> list[np.ndarray]:
        """The case's image channels (channels_of(load_image)), cached; colour kept unless in_chans is 1."""
        image = self.files.get((str(case.image), 'channels'), lambda: load_image(case, colour=self.in_chans > 1))
        return channels_of(image[0])

    def _range(self, path, chans):
        """[(lo, hi)] of one image, per channel, computed once (percentiles need the whole volume)."""
        if path not in self.ranges:
            self.ranges[path] = [intensity_range(ch, self.dcfg, i) for i, ch in enumerate(chans)]
        return self.ranges[path]

    def _body_fraction(self, path, chans):
        """Per slice: fraction of pixels above BODY_LEVEL after intensity scaling, in any channel."""
        body = functools.reduce(np.logical_or, [ch > lo + BODY_LEVEL * (hi - lo)
                                                for ch, (lo, hi) in zip(chans, self._range(path, chans))])
        if body.ndim == 2:
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
        chans = self.channels(case)
        x = torch.stack([to_unit(torch.from_numpy(take_slice(ch, self.axis, s).astype(np.float32)), lo, hi)
                         for ch, (lo, hi) in zip(chans, self._range(case.image, chans))])[None]  # (1, c, H, W)
        m = None
        if self.task == 'segmentation':
            m = torch.from_numpy(take_slice(load_mask(case, self.load), self.axis, s).astype(np.float32))[None, None]
        x, m = resize(x, m, self.size)
        if self.train:
            x, m = warp(x, m, random_affine(self.dcfg['augment']))
        # (C, S, S): a grey image repeats over the model's channels
        x = normalize(x[0].expand(self.in_chans, -1, -1), self.dcfg['mean'], self.dcfg['std'])
        item = {'image': x.contiguous(), 'case': ci, 'slice': s}
        if self.task == 'classification':
            item['label'] = torch.tensor(case.label, dtype=torch.int64)
        elif self.task == 'segmentation':
            item['mask'] = m[0, 0].round().to(torch.int64)  # (S, S)
        return item
