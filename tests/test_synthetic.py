"""synthetic.py: the generators are seeded and write real files that data.py reads like user data; stage 0's
upstream images."""
import csv
import json

import nibabel as nib
import numpy as np
import torch
from PIL import Image

import config
import data
import pretrain_backbone
import synthetic
from test_data import dcfg  # noqa: F401  (fixture)


def test_synthetic_ct_is_deterministic_and_readable(tmp_path):
    shape, spacing = (24, 20, 6), (14.4, 14.4, 20.0)  # a full-size abdomen on a coarse grid
    for name, seed in (('a', 3), ('b', 3), ('c', 4)):
        synthetic.write_synthetic_ct(tmp_path / name, n_cases=2, shape=shape, spacing=spacing, seed=seed)
    files = sorted(p.relative_to(tmp_path / 'a') for p in (tmp_path / 'a').rglob('*.nii.gz'))
    assert [str(p) for p in files] == ['imagesTr/ct_000.nii.gz', 'imagesTr/ct_001.nii.gz',
                                       'labelsTr/ct_000.nii.gz', 'labelsTr/ct_001.nii.gz']
    read = {n: [np.asarray(nib.load(tmp_path / n / p).dataobj) for p in files] for n in 'abc'}
    assert all(np.array_equal(x, y) for x, y in zip(read['a'], read['b']))
    assert not np.array_equal(read['a'][0], read['c'][0])
    image, mask = nib.load(tmp_path / 'a' / files[0]), nib.load(tmp_path / 'a' / files[2])
    assert image.shape == mask.shape == shape and image.get_data_dtype() == np.int16
    assert np.allclose(image.header.get_zooms(), spacing)
    assert nib.aff2axcodes(image.affine) == ('L', 'P', 'S')  # stored like DICOM, read back as RAS
    assert np.allclose(image.affine, mask.affine)
    hu = read['a'][0]
    assert hu.min() >= -1024 and hu.max() > 300  # air and bone
    assert set(np.unique(read['a'][2])) <= {0, 1, 2} and 1 in read['a'][2]
    rows = list(csv.reader(open(tmp_path / 'a' / 'manifest.csv')))
    assert rows == [['image', 'mask', 'label'], ['imagesTr/ct_000.nii.gz', 'labelsTr/ct_000.nii.gz', 'cyst'],
                    ['imagesTr/ct_001.nii.gz', 'labelsTr/ct_001.nii.gz', 'metastasis']]
    labels = json.loads((tmp_path / 'a' / 'dataset.json').read_text())['labels']
    assert labels == {'0': 'background', '1': 'liver', '2': 'lesion'}
    # canonical reading undoes the L/P storage: RAS affine with positive spacing, array flipped in x and y
    arr, affine = data.load(tmp_path / 'a' / files[0])
    assert np.allclose(np.diag(affine)[:3], spacing) and nib.aff2axcodes(affine) == ('R', 'A', 'S')
    assert np.array_equal(arr, hu[::-1, ::-1])


def test_synthetic_us_is_deterministic_and_readable(tmp_path):
    for name in 'ab':
        synthetic.write_synthetic_us(tmp_path / name, n_per_class=2, size=32, seed=1)
    for cls in synthetic.US_CLASSES:
        for i in range(2):
            a = [np.array(Image.open(tmp_path / 'a' / cls / f'{cls}_{i:03d}{s}.png')) for s in ('', '_mask')]
            b = [np.array(Image.open(tmp_path / 'b' / cls / f'{cls}_{i:03d}{s}.png')) for s in ('', '_mask')]
            assert all(np.array_equal(x, y) for x, y in zip(a, b))
            assert a[0].shape == a[1].shape == (32, 32) and a[0].dtype == np.uint8
            assert set(np.unique(a[1])) <= {0, 255}
            assert (a[1].max() == 0) == (cls == 'normal')  # lesions in benign/malignant only


def test_prepare_synthetic_writes_once_and_atomically(tmp_path, dcfg, monkeypatch):
    monkeypatch.setattr(synthetic, 'SYNTH_CT', dict(n_cases=4, shape=(24, 24, 6), spacing=(14.4, 14.4, 20.0)))
    cases, info = data.prepare(dcfg, tmp_path)
    assert len(cases) == 4 and all(c.mask and c.label is not None for c in cases)
    assert info == {'num_classes_seg': len(synthetic.CT_CLASSES), 'num_classes_cls': len(synthetic.CT_KINDS),
                    'intensity': 'auto -> window (NIfTI volumes, dataset.json modality CT)', 'warnings': [],
                    'data': {'layout': 'synthetic_ct', 'root': next(tmp_path.iterdir()).name},   # its folder name
                    'modes': 'window', 'in_chans': 1, 'channels': 'null -> 1 (grey images)'}
    (folder,) = list(tmp_path.iterdir())  # no temporary folder left beside it
    assert folder.name == (f'synthetic_ct-v{synthetic.GENERATOR_VERSION}-seed0-n_cases4-shape24x24x6-'
                           'spacing14.4x14.4x20.0')
    stamp = (folder / 'manifest.csv').stat().st_mtime_ns
    data.prepare(dcfg, tmp_path)
    assert (folder / 'manifest.csv').stat().st_mtime_ns == stamp  # reused, not regenerated

    monkeypatch.setattr(synthetic, 'SYNTH_US', dict(n_per_class=2, size=32))
    dcfg.update(layout='synthetic_us')
    cases, info = data.prepare(dcfg, tmp_path)
    assert len(cases) == 6 and info == {'num_classes_seg': 2, 'num_classes_cls': len(synthetic.US_CLASSES),
                                        'intensity': 'auto -> percentile (2D image files)', 'warnings': [],
                                        'data': {'layout': 'synthetic_us', 'root': cases[0].image.parents[1].name},
                                        'modes': 'percentile', 'in_chans': 1, 'channels': 'null -> 1 (grey images)'}
    assert [c.label for c in cases] == [0, 0, 1, 1, 2, 2] and cases[0].id.startswith(synthetic.US_CLASSES[0])


def test_upstream_dataset(tmp_path):
    cfg = config.load_config(config.REFERENCE_CONFIG, [f'run.cache_dir={tmp_path}', 'backbone.bootstrap.images=3',
                                                       'model.img_size=16', 'model.in_chans=3'])
    ds = pretrain_backbone.upstream_dataset(cfg)
    assert len(ds) == 3 and len(list(next(tmp_path.iterdir()).glob('*.png'))) == 3
    x = ds[0]['image']
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32
    assert torch.equal(x[0], x[1])  # grey repeated to the channels a 3-channel backbone wants
    lo, hi = (0 - 0.5) / 0.25, (1 - 0.5) / 0.25
    assert x.min() >= lo and x.max() <= hi and x.std() > 0.1


def test_upstream_images_mix_textures_and_new_patients_of_every_modality():
    """A fraction `medical` of the upstream corpus comes from the CT, MRI and ultrasound generators, 8 slices per new
    patient (the last patient gives the remainder); the rest are textures; the same seed gives the same images."""
    images = synthetic.upstream_images(50, 16, seed=3, medical=0.6)
    assert len(images) == 50 and all(im.shape == (16, 16) and im.dtype == np.uint8 for im in images)
    textures, medical = images[:20], images[20:]
    assert all(np.array_equal(a, b) for a, b in zip(textures, synthetic.upstream_images(20, 16, seed=3, medical=0)))
    assert all(np.array_equal(a, b) for a, b in zip(images, synthetic.upstream_images(50, 16, seed=3, medical=0.6)))
    ct, mri, us, ct2 = medical[:8], medical[8:16], medical[16:24], medical[24:]
    assert len(ct2) == 6
    assert all(np.array_equal(a, b) for a, b in zip(ct, synthetic.upstream_images(8, 16, seed=3, medical=1)))
    air = [np.mean(im == 0) for im in ct]                  # CT slices: air around the body clips to 0 in the window
    assert min(air) > 0.2 and max(np.mean(im == 0) for im in us) < 0.2
    assert not any(np.array_equal(a, b) for a in images for b in synthetic.upstream_images(50, 16, seed=4, medical=0.6))
