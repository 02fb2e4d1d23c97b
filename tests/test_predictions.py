"""Stage 2's test Dice on each case's own grid and the saved predictions on the source's grid: the files have the
source's shape and affine (NIfTI) or size (PNG), and the Dice a user computes from them against the original mask
files is metrics.json's."""
import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

import config
import data
import finetune
import predictions
from conftest import args, tiny_config

ZOOMS = (0.7, 0.9, 2.5)


def lps_affine(zooms, swap_xy):
    """An LPS affine with these voxel sizes; swap_xy stores the first two array axes as P, L (not L, P)."""
    affine = np.diag([-zooms[0], -zooms[1], zooms[2], 1.0])
    affine[:3, 3] = (12.0, -30.0, 40.0)
    return affine[:, [1, 0, 2, 3]] if swap_xy else affine


def msd_anisotropic(root, n=10):
    """An MSD task of n LPS-oriented, anisotropic, non-square volumes (two shapes, two axis orders) with 3-class masks:
    a bright ellipsoid (class 1) holding a darker core (class 2)."""
    rng = np.random.default_rng(0)
    (root / 'imagesTr').mkdir(parents=True)
    (root / 'labelsTr').mkdir()
    (root / 'dataset.json').write_text(json.dumps({'modality': {'0': 'MRI'},
                                                   'labels': {'0': 'background', '1': 'organ', '2': 'core'}}))
    for i in range(n):
        shape = (40, 48, 6) if i % 2 else (46, 38, 5)
        x, y, z = np.meshgrid(*(np.arange(s, dtype=float) for s in shape), indexing='ij')
        cx, cy = rng.uniform(14, 24, 2)
        r = ((x - cx) / 11) ** 2 + ((y - cy) / 8) ** 2 + ((z - shape[2] / 2) / 4) ** 2
        mask = np.where(r < 0.25, 2, np.where(r < 1, 1, 0)).astype(np.uint8)
        image = (np.array([10.0, 200.0, 90.0])[mask] + rng.normal(0, 8, shape)).astype(np.float32)
        affine = lps_affine(ZOOMS, swap_xy=i % 3 == 0)
        nib.save(nib.Nifti1Image(image, affine), root / 'imagesTr' / f'case{i}.nii.gz')
        nib.save(nib.Nifti1Image(mask, affine), root / 'labelsTr' / f'case{i}.nii.gz')
    return root


def folder_odd_sizes(root, per_class=5):
    """Class folders a/ and b/ of odd-sized PNG images with 0/255 masks beside them; one name holds a space."""
    rng = np.random.default_rng(1)
    for cls in ('a', 'b'):
        (root / cls).mkdir(parents=True)
        for i in range(per_class):
            h, w = (37, 29) if i % 2 else (31, 43)
            y, x = np.mgrid[:h, :w]
            mask = ((y - rng.uniform(10, h - 10)) ** 2 + (x - rng.uniform(10, w - 10)) ** 2 < 64).astype(np.uint8)
            image = np.clip(40 + 160 * mask + rng.normal(0, 10, (h, w)), 0, 255).astype(np.uint8)
            name = f'img {i}' if i == 0 else f'img{i}'
            Image.fromarray(image).save(root / cls / f'{name}.png')
            Image.fromarray(mask * 255).save(root / cls / f'{name}_mask.png')
    return root


def dice_from_files(pairs, num_classes):
    """metrics.json's Dice recomputed from (prediction, mask) arrays: per class per volume (absent from both: NaN), the
    mean over volumes per class, then over classes."""
    per_volume = []
    for pred, mask in pairs:
        assert pred.shape == mask.shape
        row = []
        for c in range(1, num_classes):
            p, g = pred == c, mask == c
            denom = p.sum() + g.sum()
            row.append(np.nan if denom == 0 else 2.0 * (p & g).sum() / denom)
        per_volume.append(row)
    per_class = np.nanmean(np.array(per_volume), 0)
    return float(np.nanmean(per_class)), per_class


def stage2_with_predictions(tmp_path, cache, sets, **finetune_keys):
    """Stage 2 (random LoRA) with save_predictions on the data of `sets`: its run folder, its test metrics and the
    test cases as data.py lists them."""
    cfg = tiny_config(tmp_path, cache, finetune={**finetune_keys, 'save_predictions': True})
    sets = [*sets, 'data.test_fraction=0.4']
    run_dir = finetune.main(args(cfg, 'finetune.init=random', *sets))
    dcfg = config.load_config(cfg, sets)['data']
    cases = data.split_cases(data.prepare(dcfg, None)[0], dcfg)['test']
    return run_dir, json.loads((run_dir / 'metrics.json').read_text())['test'], cases


def test_predictions_are_on_the_source_grid_and_give_the_reported_dice(tmp_path, cache):
    root = msd_anisotropic(tmp_path / 'Task')
    run_dir, metrics, cases = stage2_with_predictions(tmp_path, cache, ['data.layout=msd', f'data.root={root}'],
                                                      epochs=2, batch_size=8)
    assert {nib.aff2axcodes(nib.load(c.image).affine) for c in cases} == {('L', 'P', 'S'), ('P', 'L', 'S')}
    assert sorted(p.name for p in (run_dir / 'predictions').glob('*_pred.nii.gz')) == \
        sorted(f'{c.id}_pred.nii.gz' for c in cases)
    pairs = []
    for c in cases:
        source, pred = nib.load(c.image), nib.load(run_dir / 'predictions' / f'{c.id}_pred.nii.gz')
        assert pred.shape == source.shape and np.allclose(pred.affine, source.affine)
        assert np.allclose(pred.header.get_zooms(), source.header.get_zooms())
        pairs.append((np.asarray(pred.dataobj), np.asarray(nib.load(c.mask).dataobj)))   # the files, as stored
    mean, per_class = dice_from_files(pairs, 3)
    assert 0 < mean < 1                                                          # the model predicts foreground
    assert metrics['dice_mean'] == pytest.approx(mean, abs=1e-6)
    assert [metrics['dice_1'], metrics['dice_2']] == pytest.approx(per_class.tolist(), abs=1e-6)
    with open(run_dir / 'predictions' / 'cases.csv') as f:
        listed = {(r['case'], r['prediction']) for r in csv.DictReader(f)}
    assert listed == {(c.id, f'{c.id}_pred.nii.gz') for c in cases}


def test_2d_predictions_with_class_folder_ids_have_the_image_size(tmp_path, cache):
    root = folder_odd_sizes(tmp_path / 'folders')
    run_dir, metrics, cases = stage2_with_predictions(tmp_path, cache, ['data.layout=folder', f'data.root={root}'],
                                                      epochs=4, batch_size=4)
    assert all('/' in c.id for c in cases) and any(' ' in c.id for c in cases)
    out = run_dir / 'predictions'
    files = {c.id: out / (c.id.replace('/', '__').replace(' ', '_') + '_pred.png') for c in cases}
    assert sorted(p.name for p in out.glob('*_pred.png')) == sorted(p.name for p in files.values())
    pairs = []
    for c in cases:
        with Image.open(files[c.id]) as pred, Image.open(c.image) as source:
            assert pred.size == source.size
            pairs.append((np.asarray(pred), data.load_mask(c)))              # masks as read: 0/255 is 0/1
    mean = dice_from_files(pairs, 2)[0]
    assert 0 < mean < 1                                                          # the model predicts foreground
    assert metrics['dice_mean'] == pytest.approx(mean, abs=1e-6)
    assert (out / 'overlay.png').stat().st_size > 0


def test_prediction_names_stay_in_the_folder_and_never_collide():
    ids = ['a/b', 'a__b', 'A/B', '../../etc/x', 'p 1', 'p?1', 'same', 'same', '.hidden', 'c\\d']
    cases = [data.Case(cid, Path(f'/d/{i}.png'), None, None) for i, cid in enumerate(ids)]
    names = predictions.prediction_names(cases)
    assert len({n.casefold() for n in names}) == len(names)
    assert all('/' not in n and '\\' not in n and not n.startswith('.') and n.endswith('_pred.png') for n in names)
    assert names[:2] == ['a__b_pred.png', 'a__b_2_pred.png'] and names[6:8] == ['same_pred.png', 'same_2_pred.png']
    assert predictions.prediction_names([data.Case('c', Path('/d/c.nii.gz'), None, None)]) == ['c_pred.nii.gz']


@pytest.mark.parametrize('shape, swap', [((40, 48, 6), False), ((40, 48, 6), True), ((40, 1, 6), True)])
def test_to_source_grid_undoes_the_canonical_reorientation(tmp_path, shape, swap):
    """Volumes in both axis orders, and a single slice (read as a 2D image) written back with its axis of length 1."""
    labels = np.random.default_rng(0).integers(0, 3, shape).astype(np.uint8)
    path = tmp_path / 'm.nii.gz'
    nib.save(nib.Nifti1Image(labels, lps_affine(ZOOMS, swap)), path)
    canonical = data.load(path, mask=True)[0]
    assert canonical.ndim == len(shape) - shape.count(1)
    back = data.to_source_grid(canonical, path)
    assert np.array_equal(np.asarray(back.dataobj), labels) and np.allclose(back.affine, nib.load(path).affine)
