"""data.py: layout readers, validation errors, intensities, slicing, splits, augmentation."""
import copy
import csv
import gzip
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import data
from data import Case, DataError

CONFIG = yaml.safe_load((Path(__file__).resolve().parents[1] / 'config.yaml').read_text())


@pytest.fixture
def dcfg():
    return copy.deepcopy(CONFIG['data'])


def save_nifti(path, arr, affine=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(arr), np.eye(4) if affine is None else affine), path)
    return path


def save_png(path, arr):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(arr, np.uint8)).save(path)
    return path


def write_csv(path, rows):
    with open(path, 'w', newline='') as f:
        csv.writer(f).writerows(rows)
    return path


def msd_tree(root, n=3, shape=(8, 8, 4)):
    """n cases with a bright cube labelled 1, plus a dataset.json with two labels."""
    for i in range(n):
        img = np.zeros(shape, np.int16)
        img[2:6, 2:6, 1:3] = 100
        save_nifti(root / 'imagesTr' / f'c{i}.nii.gz', img)
        save_nifti(root / 'labelsTr' / f'c{i}.nii.gz', (img > 0).astype(np.uint8))
    (root / 'dataset.json').write_text(json.dumps({'labels': {'0': 'background', '1': 'organ'}}))
    return root


# ---------------------------------------------------------------------------------------------------- intensities

def test_window_percentile_none_and_normalize(dcfg):
    hu = np.array([-1000, -160, 40, 240, 1000], np.int16)
    lo, hi = data.intensity_range(hu, dict(dcfg, intensity='window'))  # window [-160, 240]
    assert data.to_unit(torch.tensor(hu, dtype=torch.float32), lo, hi).tolist() == [0, 0, 0.5, 1, 1]
    ramp = np.arange(1001, dtype=np.float32)
    lo, hi = data.intensity_range(ramp, dict(dcfg, intensity='percentile', percentile=[0.5, 99.5]))
    assert (lo, hi) == (5.0, 995.0)
    assert data.to_unit(torch.tensor([0.0, 5.0, 500.0, 995.0, 1000.0]), lo, hi).tolist() == [0, 0, 0.5, 1, 1]
    assert data.intensity_range(np.zeros(3, np.uint8), dict(dcfg, intensity='none')) == (0.0, 255.0)
    assert data.intensity_range(np.zeros(3, np.uint16), dict(dcfg, intensity='none')) == (0.0, 65535.0)
    assert data.intensity_range(np.zeros(3, np.float32), dict(dcfg, intensity='none')) == (0.0, 1.0)
    x = torch.tensor([0.0, 0.5, 1.0]).view(1, 1, 3).expand(3, 1, 3)
    out = data.normalize(x, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    assert torch.allclose(out[2, 0], (torch.tensor([0.0, 0.5, 1.0]) - 0.406) / 0.225)
    assert data.normalize(x[:1], [0.5], [0.25]).flatten().tolist() == [-2, 0, 2]


def test_auto_intensity_is_chosen_from_the_data_in_prepare(tmp_path, dcfg):
    assert dcfg['intensity'] == 'auto'                                         # the default

    def resolved(**keys):
        cfg = dict(dcfg, **keys)
        info = data.prepare(cfg, tmp_path)[1]
        assert cfg == dict(dcfg, **keys)                                       # left as given: the stage sets the mode
        return info['modes'], info['intensity']
    npz = str(medmnist_npz(tmp_path / 'm.npz')[0])
    assert resolved(layout='medmnist', root=npz) == ('none', 'auto -> none (MedMNIST arrays)')
    for cls in ('a', 'b'):
        save_png(tmp_path / 'f' / cls / '0.png', np.eye(8) * 100)
    folder = str(tmp_path / 'f')
    assert resolved(layout='folder', root=folder) == ('percentile', 'auto -> percentile (2D image files)')
    root = msd_tree(tmp_path / 'T')                                            # NIfTI, no modality in dataset.json
    assert resolved(layout='msd', root=str(root)) == ('window', 'auto -> window (NIfTI volumes, read as CT)')
    labels = json.loads((root / 'dataset.json').read_text())
    for key, name, mode in (('modality', 'CT', 'window'), ('modality', 'MRI', 'percentile'),
                            ('channel_names', 'T2', 'percentile')):            # MSD, MSD, nnU-Net v2
        (root / 'dataset.json').write_text(json.dumps({**labels, key: {'0': name}}))
        assert resolved(layout='msd', root=str(root)) == (mode, f'auto -> {mode} (NIfTI volumes, dataset.json '
                                                                f'modality {name})')
    assert resolved(layout='msd', root=str(root), intensity='window') == ('window', 'window')   # explicit: as set
    bad(dcfg, r'm.npz/train_images/0: data.intensity window expects CT', layout='medmnist', root=npz,
        intensity='window')
    bad(dcfg, r'f/a/0.png: data.intensity window expects CT', layout='folder', root=folder, intensity='window')
    with pytest.raises(ValueError, match=r"data.intensity 'auto': SliceDataset needs modes of"):   # prepare first
        data.SliceDataset(data.read_cases(dict(dcfg, layout='folder', root=folder), tmp_path)[0], dcfg, 8, 1, None,
                          train=False)


# ---------------------------------------------------------------------------------------------------- slicing

def test_slicing_along_each_axis_after_canonical(tmp_path, dcfg):
    i, j, k = np.meshgrid(np.arange(6), np.arange(6), np.arange(6), indexing='ij')
    canonical = (100 * i + 10 * j + k).astype(np.int16)  # value encodes the RAS voxel index
    lps = np.diag([-1.0, -1.0, 1.0, 1.0])
    lps[:2, 3] = 5
    path = save_nifti(tmp_path / 'v.nii.gz', canonical[::-1, ::-1], lps)  # stored flipped in x and y
    case = Case('v', path, None, None)
    assert np.allclose(data.load(path)[1], np.eye(4))                   # canonical affine
    dcfg.update(intensity='window', window=[0, 1000], mean=[0.0], std=[1.0])
    for axis in (0, 1, 2):
        ds = data.SliceDataset([case], dict(dcfg, axis=axis), img_size=6, in_chans=1, task=None, train=False)
        assert len(ds) == 6 and [ds[s]['slice'] for s in range(6)] == list(range(6))
        for s in (0, 4):
            expected = np.take(canonical, s, axis=axis) / 1000
            assert np.allclose(ds[s]['image'][0].numpy(), expected, atol=1e-6)
            assert np.array_equal(data.take_slice(canonical, axis, s), np.take(canonical, s, axis=axis))


def test_slice_dataset_items_order_and_skip_empty(tmp_path, dcfg):
    vol = np.full((16, 12, 5), -1000, np.int16)
    vol[2:14, 2:10, 1:4] = 50  # body on slices 1..3 only
    mask = (vol > 0).astype(np.uint8)
    cases = [Case(f'c{n}', save_nifti(tmp_path / f'c{n}.nii.gz', vol), save_nifti(tmp_path / f'm{n}.nii.gz', mask),
                  n % 2) for n in range(2)]
    dcfg['intensity'] = 'window'                                  # as prepare resolves auto for these NIfTI files
    stage1 = data.SliceDataset(cases, dcfg, 8, 1, None, train=True)
    assert len(stage1) == 6 and stage1.skipped == 4
    seg = data.SliceDataset(cases, dcfg, 8, 3, 'segmentation', train=False)
    assert [(seg[n]['case'], seg[n]['slice']) for n in range(len(seg))] == [(c, s) for c in (0, 1) for s in range(5)]
    assert [seg.sample_index(n) for n in range(len(seg))] == [(c, s) for c in (0, 1) for s in range(5)]
    item = seg[2]
    assert item['image'].shape == (3, 8, 8) and item['image'].dtype == torch.float32
    assert item['mask'].shape == (8, 8) and item['mask'].dtype == torch.int64
    assert item['mask'].unique().tolist() == [0, 1]          # slice 2 has body (1) and background (0)
    cls = data.SliceDataset(cases, dcfg, 8, 1, 'classification', train=True)
    assert cls[7]['label'].dtype == torch.int64 and cls[7]['label'].item() == 1
    batch = next(iter(torch.utils.data.DataLoader(seg, batch_size=4)))
    assert batch['image'].shape == (4, 3, 8, 8) and batch['mask'].shape == (4, 8, 8)
    with pytest.raises(DataError, match='no label for task classification'):
        data.SliceDataset([Case('x', cases[0].image, None, None)], dcfg, 8, 1, 'classification', False)


# ---------------------------------------------------------------------------------------------------- augmentation

def test_warp_keeps_mask_on_image():
    torch.manual_seed(0)
    aug = dict(crop_scale=[0.3, 1.0], hflip=0.5, vflip=0.5, rotate=45)
    mask = torch.zeros(1, 1, 32, 32)
    mask[..., 5:20, 8:14] = 1
    mask[..., 22:30, 18:31] = 1
    for _ in range(20):
        image, warped = data.warp(mask.clone(), mask.clone(), data.random_affine(aug))
        # where bilinear gives exactly 0 or 1, all pixels it mixed share that class; nearest picks one of them
        pure = ((image == 0) | (image == 1))
        assert pure.float().mean() > 0.5
        assert torch.equal(warped[pure], image[pure])


def test_resize_keeps_mask_on_image():
    mask = torch.zeros(1, 1, 96, 96)
    mask[..., 30:61, 10:41] = 1
    image, small = data.resize(mask.clone(), mask.clone(), 64)
    ys, xs = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing='ij')
    centre = [(45 + 0.5) * 64 / 96 - 0.5, (25 + 0.5) * 64 / 96 - 0.5]  # source box centre in output pixels
    for w in (image[0, 0], small[0, 0]):  # nearest-exact samples the pixel centres bilinear uses: same place
        assert abs((w * ys).sum() / w.sum() - centre[0]) < 0.2 and abs((w * xs).sum() / w.sum() - centre[1]) < 0.2


def test_augmented_segmentation_items_line_up(tmp_path, dcfg):
    mask = np.zeros((16, 16, 3), np.uint8)
    mask[3:9, 4:14] = 1
    mask[10:15, 2:7] = 2
    case = Case('c', save_nifti(tmp_path / 'i.nii.gz', mask.astype(np.int16) * 500),
                save_nifti(tmp_path / 'm.nii.gz', mask), None)
    dcfg.update(intensity='window', window=[0, 1000], mean=[0.0], std=[1.0],
                augment=dict(crop_scale=[0.5, 1], hflip=0.5, vflip=0.5, rotate=30))
    ds = data.SliceDataset([case], dcfg, 16, 1, 'segmentation', train=True)
    torch.manual_seed(1)
    for n in range(9):
        item = ds[n % 3]
        level = item['image'][0] * 2  # back to class index
        pure = (level == level.round()) & (level.round() >= 0)
        assert torch.equal(item['mask'][pure], level[pure].long())


# ---------------------------------------------------------------------------------------------------- splits

def test_splits_are_by_case_deterministic_and_stratified(dcfg):
    cases = [Case(f'p{n // 2}', Path(f'p{n}.png'), None, n // 2 % 2) for n in range(80)]  # 2 images per patient
    splits = data.split_cases(cases, dcfg)
    assert splits == data.split_cases(list(cases), dcfg)
    ids = {s: {c.id for c in splits[s]} for s in ('train', 'val', 'test')}
    assert not ids['train'] & ids['val'] and not ids['train'] & ids['test'] and not ids['val'] & ids['test']
    assert sum(map(len, ids.values())) == 40 and (len(ids['test']), len(ids['val'])) == (10, 6)
    assert {c.label for c in splits['test']} == {0, 1} and {c.label for c in splits['val']} == {0, 1}
    assert splits['labelled'] == splits['train']
    few = data.split_cases(cases, dict(dcfg, label_fraction=0.1))
    assert few['train'] == splits['train'] and len({c.id for c in few['labelled']}) == 2
    assert {c.label for c in few['labelled']} == {0, 1} and {c.id for c in few['labelled']} <= ids['train']
    one = data.split_cases(cases, dict(dcfg, label_fraction=0.001))
    assert len({c.id for c in one['labelled']}) == 1
    other = data.split_cases(cases, dict(dcfg, split_seed=1))
    assert {c.id for c in other['test']} != ids['test']


def test_split_column_wins_and_empty_splits_raise(dcfg):
    cases = [Case(f'c{n}', Path(f'c{n}.png'), None, 0, split) for n, split in enumerate(['train'] * 3 + ['val',
                                                                                                       'test'])]
    splits = data.split_cases(cases, dcfg)
    assert [c.id for c in splits['val']] == ['c3'] and [c.id for c in splits['test']] == ['c4']
    with pytest.raises(DataError, match="split column: no case has split 'val'"):
        data.split_cases([c for c in cases if c.split != 'val'], dcfg)
    plain = [Case(f'c{n}', Path(f'c{n}.png'), None, None) for n in range(4)]
    with pytest.raises(DataError, match='leaves no training case'):            # 1 + 1 of 2 cases
        data.split_cases(plain[:2], dict(dcfg, val_fraction=0.1, test_fraction=0.1))


# ---------------------------------------------------------------------------------------------------- layouts

def test_msd_layout_with_nnunet_names_and_junk(tmp_path, dcfg):
    root = msd_tree(tmp_path / 'Task')
    (root / 'imagesTr' / 'c0.nii.gz').rename(root / 'imagesTr' / 'c0_0000.nii.gz')  # nnU-Net v2 channel suffix
    (root / 'imagesTr' / '._c1.nii.gz').write_bytes(b'\0\5\26\7')  # macOS resource file as in the MSD archives
    cases, info = data.prepare(dict(dcfg, layout='msd', root=str(root)), tmp_path)
    assert [c.id for c in cases] == ['c0', 'c1', 'c2']
    assert info.items() >= {'num_classes_seg': 2, 'num_classes_cls': None,       # from dataset.json's two labels
                            'intensity': 'auto -> window (NIfTI volumes, read as CT)', 'in_chans': 1,
                            'channels': 'null -> 1 (grey images)'}.items()


def test_csv_layout_names_labels_and_png(tmp_path, dcfg):
    for n in range(4):
        save_png(tmp_path / 'img' / f'{n}.png', np.eye(10, 12) * 100 + 40 * n)
        save_png(tmp_path / 'img' / f'{n}_seg.png', np.eye(10, 12) * 255)  # 0/255 binary mask
    manifest = write_csv(tmp_path / 'list.csv', [['image', 'mask', 'label']] +
                         [[f'img/{n}.png', f'img/{n}_seg.png', ['benign', 'malignant'][n % 2]] for n in range(4)])
    cases, info = data.prepare(dict(dcfg, layout='csv', root=str(manifest), intensity='percentile'), tmp_path)
    assert [c.label for c in cases] == [0, 1, 0, 1] and info['num_classes_cls'] == 2   # names, sorted
    assert info['num_classes_seg'] == 2 and set(np.unique(data.load_mask(cases[0]))) == {0, 1}


def test_folder_layout_with_masks(tmp_path, dcfg):
    for cls in ('b', 'a'):
        for n in range(2):
            save_png(tmp_path / cls / f'{n}.png', np.eye(8) * 100)
            save_png(tmp_path / cls / f'{n}_mask.png', np.pad(np.full((2, 2), 255), 3))
    save_png(tmp_path / 'a' / '0_mask_1.png', np.pad(np.full((1, 1), 255), ((0, 7), (0, 7))))  # BUSI's second mask
    cases, info = data.prepare(dict(dcfg, layout='folder', root=str(tmp_path), intensity='none'), tmp_path)
    assert [(c.id, c.label) for c in cases] == [('a/0', 0), ('a/1', 0), ('b/0', 1), ('b/1', 1)]
    assert info['num_classes_cls'] == 2 and cases[0].extra_masks == (tmp_path / 'a' / '0_mask_1.png',)
    assert data.load_mask(cases[0]).sum() == 5  # both masks, merged


def medmnist_npz(path, counts=(6, 4, 4), shape=(28, 28), classes=3, seed=0, **arrays):
    """A small .npz in MedMNIST v2's format: <split>_images uint8 (N, *shape) and <split>_labels (N, 1) for
    train / val / test; `arrays` replaces arrays, or removes them when None."""
    rng = np.random.default_rng(seed)
    npz = {}
    for split, n in zip(data.SPLITS, counts):
        npz[f'{split}_images'] = rng.integers(0, 256, (n, *shape), dtype=np.uint8)
        npz[f'{split}_labels'] = (np.arange(n) % classes).astype(np.uint8)[:, None]
    npz.update(arrays)
    np.savez(path, **{k: v for k, v in npz.items() if v is not None})
    return path, npz


def test_medmnist_2d_uses_the_files_splits_and_memory(tmp_path, dcfg):
    path, npz = medmnist_npz(tmp_path / 'pneumoniamnist.npz')
    dcfg.update(layout='medmnist', root=str(path), mean=[0.0], std=[1.0], label_fraction=0.5)   # intensity auto
    cases, info = data.prepare(dcfg, tmp_path)
    assert info.items() >= {'num_classes_seg': None, 'num_classes_cls': 3,
                            'intensity': 'auto -> none (MedMNIST arrays)', 'in_chans': 1,
                            'channels': 'null -> 1 (grey images)'}.items()
    assert len(cases) == 14 and info['modes'] == 'none' and dcfg['intensity'] == 'auto'
    assert list(tmp_path.iterdir()) == [path]                                  # nothing written: read from memory
    splits = data.split_cases(cases, dcfg)
    assert [len(splits[s]) for s in ('train', 'val', 'test', 'labelled')] == [6, 4, 4, 3]   # label_fraction on train
    assert [c.label for c in splits['val']] == npz['val_labels'][:, 0].tolist()
    ds = data.SliceDataset(splits['test'], dict(dcfg, intensity=info['modes']), 28, 1, 'classification', train=False)
    assert len(ds) == 4 and ds[2]['label'].item() == npz['test_labels'][2, 0]
    assert torch.equal(ds[2]['image'][0], torch.from_numpy(npz['test_images'][2] / np.float32(255)))
    medmnist_npz(path, counts=(8, 4, 4))                                       # the file replaced: read again
    assert len(data.prepare(dcfg, tmp_path)[0]) == 16


def test_medmnist_rgb_is_read_grey_as_2d_files_are(tmp_path, dcfg):
    path, npz = medmnist_npz(tmp_path / 'dermamnist.npz', shape=(28, 28, 3))
    dcfg.update(layout='medmnist', root=str(path), intensity='none', mean=[0.0], std=[1.0])
    ds = data.SliceDataset(data.prepare(dcfg, tmp_path)[0][:2], dcfg, 28, 1, None, train=False)
    save_png(tmp_path / 'x.png', npz['train_images'][1])                      # the same image as an RGB PNG
    assert torch.equal(ds[1]['image'][0], torch.from_numpy(data.load(tmp_path / 'x.png')[0] / np.float32(255)))


def test_medmnist_3d_volumes_are_sliced_per_case(tmp_path, dcfg):
    path, npz = medmnist_npz(tmp_path / 'organmnist3d.npz', shape=(5, 8, 8), classes=2)     # (N, D, H, W)
    dcfg.update(layout='medmnist', root=str(path), intensity='none', mean=[0.0], std=[1.0])
    cases = data.split_cases(data.prepare(dcfg, tmp_path)[0], dcfg)['val']
    ds = data.SliceDataset(cases, dcfg, 8, 1, 'classification', train=False)
    assert len(ds) == 4 * 5 and [ds.sample_index(n) for n in range(5)] == [(0, s) for s in range(5)]
    item = ds[1 * 5 + 3]                                                       # case 1, slice 3: along D (data.axis 2)
    assert item['label'].item() == 1 and (item['case'], item['slice']) == (1, 3)
    assert torch.equal(item['image'][0], torch.from_numpy(npz['val_images'][1, 3] / np.float32(255)))


def test_medmnist_malformed_files_raise_named_errors(tmp_path, dcfg):
    def bad_npz(match, intensity='none', **arrays):
        folder = tmp_path / str(len(list(tmp_path.iterdir())))                 # a new file each time
        folder.mkdir()
        bad(dcfg, match, layout='medmnist', root=str(medmnist_npz(folder / 'm.npz', **arrays)[0]), intensity=intensity)
    bad_npz(r"m.npz: no 'val_labels' array", val_labels=None)
    bad_npz(r'm.npz: test_labels has shape \(3, 1\) for 4 test_images; expected \(4, 1\)',
            test_labels=np.zeros((3, 1), np.uint8))
    bad_npz(r'm.npz: train_labels has 14 labels per image \(multi-label, as ChestMNIST\)',
            train_labels=np.zeros((6, 14), np.uint8))
    bad_npz(r'm.npz: val_images has shape \(4, 784\) and dtype uint8; expected uint8 \(N, H, W\)',
            val_images=np.zeros((4, 784), np.uint8))
    bad_npz(r'm.npz: train_images has shape \(6, 28, 28\) and dtype float32',
            train_images=np.zeros((6, 28, 28), np.float32))
    bad_npz(r'm.npz/train_images/0: data.intensity window expects CT', intensity='window')
    bad(dcfg, r'nothing.npz: file not found .*data.root', layout='medmnist', root=str(tmp_path / 'nothing.npz'))
    (tmp_path / 'junk.npz').write_bytes(b'not a zip')
    bad(dcfg, r'junk.npz: unreadable .npz', layout='medmnist', root=str(tmp_path / 'junk.npz'))


# ---------------------------------------------------------------------------------------------------- bad input

def bad(dcfg, match, **cfg):
    with pytest.raises(DataError, match=match):
        data.prepare(dict(dcfg, **cfg), Path('/nonexistent-cache'))


def test_missing_and_unreadable_files(tmp_path, dcfg):
    root = msd_tree(tmp_path / 'T')
    (root / 'labelsTr' / 'c1.nii.gz').unlink()
    bad(dcfg, r'imagesTr/c1.nii.gz: no mask .*labelsTr/c1.nii.gz', layout='msd', root=str(root))
    root = msd_tree(tmp_path / 'U')
    (root / 'imagesTr' / 'c2.nii.gz').unlink()
    bad(dcfg, r'labelsTr/c2.nii.gz: mask without an image', layout='msd', root=str(root))
    csv_path = write_csv(root / 'm.csv', [['image', 'mask'], ['imagesTr/c0.nii.gz', 'labelsTr/c0.nii.gz'],
                                          ['imagesTr/gone.nii.gz', 'labelsTr/c1.nii.gz']])
    bad(dcfg, r'gone.nii.gz: image file not found', layout='csv', root=str(csv_path))
    csv_path = write_csv(root / 'n.csv', [['image', 'mask'], ['imagesTr/c0.nii.gz', 'labelsTr/nope.nii.gz']])
    bad(dcfg, r'nope.nii.gz: mask file not found', layout='csv', root=str(csv_path))
    root = msd_tree(tmp_path / 'V')
    full = (root / 'imagesTr' / 'c1.nii.gz').read_bytes()
    (root / 'imagesTr' / 'c1.nii.gz').write_bytes(full[:len(full) // 2])  # truncated download
    bad(dcfg, r'imagesTr/c1.nii.gz: unreadable or truncated', layout='msd', root=str(root))
    (root / 'imagesTr' / 'c1.nii.gz').write_bytes(gzip.compress(b'not a nifti header'))
    bad(dcfg, r'imagesTr/c1.nii.gz: unreadable or truncated', layout='msd', root=str(root))


def test_mismatched_mask_and_out_of_range_labels(tmp_path, dcfg):
    root = msd_tree(tmp_path / 'A')
    save_nifti(root / 'labelsTr' / 'c1.nii.gz', np.zeros((8, 8, 5), np.uint8))
    bad(dcfg, r'labelsTr/c1.nii.gz: mask shape \(8, 8, 5\) differs from image', layout='msd', root=str(root))
    root = msd_tree(tmp_path / 'B')
    save_nifti(root / 'labelsTr' / 'c1.nii.gz', np.zeros((8, 8, 4), np.uint8), np.diag([2.0, 1, 1, 1]))
    bad(dcfg, r'labelsTr/c1.nii.gz: mask affine differs', layout='msd', root=str(root))
    root = msd_tree(tmp_path / 'C')
    save_nifti(root / 'labelsTr' / 'c2.nii.gz', np.full((8, 8, 4), 5, np.uint8))
    bad(dcfg, r'labelsTr/c2.nii.gz: mask values \[5\] outside the 2 classes', layout='msd', root=str(root))
    root = msd_tree(tmp_path / 'D')
    save_nifti(root / 'labelsTr' / 'c2.nii.gz', np.full((8, 8, 4), 0.5, np.float32))
    bad(dcfg, r'labelsTr/c2.nii.gz: mask has non-integer values', layout='msd', root=str(root))
    csv_path = write_csv(tmp_path / 'A' / 'l.csv', [['image', 'label'], ['imagesTr/c0.nii.gz', '0'],
                                                    ['imagesTr/c2.nii.gz', '3']])
    bad(dcfg, r'imagesTr/c2.nii.gz: label 3 outside the 2 classes', layout='csv', root=str(csv_path), num_classes=2)
    csv_path = write_csv(tmp_path / 'A' / 'e.csv', [['image', 'label'], ['imagesTr/c0.nii.gz', '']])
    bad(dcfg, r'e.csv line 2: empty "label"', layout='csv', root=str(csv_path))


def test_bad_2d_inputs(tmp_path, dcfg):
    save_png(tmp_path / 'a' / 'x.png', np.zeros((8, 8)))
    save_png(tmp_path / 'a' / 'y.png', np.zeros((8, 8)))
    save_png(tmp_path / 'a' / 'x_mask.png', np.zeros((8, 9)))
    bad(dcfg, r'a/y.png: no mask', layout='folder', root=str(tmp_path), intensity='none')
    save_png(tmp_path / 'a' / 'y_mask.png', np.zeros((8, 8)))
    bad(dcfg, r'a/x_mask.png: mask shape \(8, 9\) differs', layout='folder', root=str(tmp_path), intensity='none')
    bad(dcfg, r'a/x.png: data.intensity window expects CT', layout='folder', root=str(tmp_path), intensity='window')
    save_png(tmp_path / 'a' / 'z_mask.png', np.zeros((8, 8)))
    bad(dcfg, r'a/z_mask.png: mask without an image', layout='folder', root=str(tmp_path), intensity='none')
    (tmp_path / 'b').mkdir()
    (tmp_path / 'b' / 'w.png').write_bytes(b'\x89PNG\r\n\x1a\n broken')
    (tmp_path / 'a' / 'z_mask.png').unlink()
    bad(dcfg, r'b/w.png: unreadable or truncated', layout='folder', root=str(tmp_path), intensity='none',
        mask_suffix='_none')


def test_lossy_and_colour_masks(tmp_path, dcfg):
    save_png(tmp_path / 'x.png', np.zeros((8, 8)))
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / 'x_mask.jpg')
    manifest = write_csv(tmp_path / 'm.csv', [['image', 'mask'], ['x.png', 'x_mask.jpg']])
    bad(dcfg, r'x_mask.jpg: JPEG masks change label values', layout='csv', root=str(manifest), intensity='none')
    Image.fromarray(np.dstack([np.zeros((8, 8)), np.ones((8, 8)), np.zeros((8, 8))]).astype(np.uint8)).save(
        tmp_path / 'x_rgb.png')
    manifest = write_csv(tmp_path / 'n.csv', [['image', 'mask', 'case'], ['x.png', 'x_rgb.png', 'patient7']])
    bad(dcfg, r'x_rgb.png: colour mask', layout='csv', root=str(manifest), intensity='none')


def test_non_finite_voxels_refused(tmp_path, dcfg):
    root = msd_tree(tmp_path / 'T')
    img = np.zeros((8, 8, 4), np.float32)
    img[0, 0, :2], img[1, 1, 1] = np.nan, np.inf
    save_nifti(root / 'imagesTr' / 'c1.nii.gz', img)
    bad(dcfg, r'imagesTr/c1.nii.gz: 3 NaN/Inf voxels', layout='msd', root=str(root))


def test_mask_values_must_be_class_indices(tmp_path, dcfg):
    for n in range(2):
        save_png(tmp_path / f'{n}.png', np.full((8, 8), 9))
        save_png(tmp_path / f'{n}_m.png', np.pad(np.full((2, 2), 128), 3))          # 0/128: not 0..K-1, not 0/255
    manifest = write_csv(tmp_path / 'm.csv', [['image', 'mask']] + [[f'{n}.png', f'{n}_m.png'] for n in range(2)])
    bad(dcfg, r'_m.png: mask value 128, but no mask holds 1, 2, 3, 4, 5, ...', layout='csv', root=str(manifest),
        intensity='none')
    root = msd_tree(tmp_path / 'T')
    save_nifti(root / 'labelsTr' / 'c1.nii.gz', np.pad(np.full((2, 2, 2), 3, np.uint8), ((3, 3), (3, 3), (1, 1))))
    (root / 'dataset.json').unlink()                                     # classes inferred: 0, 1, 3 has a gap
    bad(dcfg, r'labelsTr/c1.nii.gz: mask value 3, but no mask holds 2;', layout='msd', root=str(root))
    _, info = data.prepare(dict(dcfg, layout='msd', root=str(root), num_classes=4), tmp_path)
    assert info['num_classes_seg'] == 4                                  # a count that is given allows unused classes


def test_one_class_data_refused_for_its_task(tmp_path, dcfg):
    for n in range(3):
        save_png(tmp_path / 'f' / 'only' / f'{n}.png', np.eye(8) * 9)
    folder = dict(dcfg, layout='folder', root=str(tmp_path / 'f'), intensity='none')
    with pytest.raises(DataError, match=r'f/only/0.png .*all 3 labelled images have class 0 \(only\)'):
        data.prepare(folder, tmp_path, task='classification')
    assert data.prepare(folder, tmp_path)[1]['num_classes_cls'] == 1     # images only (stage 1): accepted
    root = msd_tree(tmp_path / 'T')
    for n in range(3):
        save_nifti(root / 'labelsTr' / f'c{n}.nii.gz', np.zeros((8, 8, 4), np.uint8))
    msd = dict(dcfg, layout='msd', root=str(root))
    with pytest.raises(DataError, match=r'labelsTr/c0.nii.gz .*all 3 masks hold only background'):
        data.prepare(msd, tmp_path, task='segmentation')
    assert data.prepare(msd, tmp_path)[1]['num_classes_seg'] == 2


def test_empty_class_folder_refused(tmp_path, dcfg):
    save_png(tmp_path / 'a' / 'x.png', np.zeros((8, 8)))
    save_png(tmp_path / 'c' / 'y.png', np.zeros((8, 8)))
    (tmp_path / 'b').mkdir()
    (tmp_path / 'b' / '.DS_Store').write_bytes(b'')
    bad(dcfg, r'/b: class folder without images', layout='folder', root=str(tmp_path), intensity='none')


def test_negative_and_non_utf8_csv_labels(tmp_path, dcfg):
    save_png(tmp_path / 'x.png', np.zeros((8, 8)))
    save_png(tmp_path / 'y.png', np.zeros((8, 8)))
    manifest = write_csv(tmp_path / 'm.csv', [['image', 'label'], ['x.png', '1'], ['y.png', '-1']])
    bad(dcfg, r'm.csv line 3: label -1 is negative', layout='csv', root=str(manifest), intensity='none')
    (tmp_path / 'l.csv').write_bytes('image,label\nx.png,bénin\ny.png,malin\n'.encode('latin-1'))
    bad(dcfg, r'l.csv: not UTF-8 text .*byte 19', layout='csv', root=str(tmp_path / 'l.csv'), intensity='none')


def test_label_seed_changes_the_labelled_subset_and_nothing_else(dcfg):
    cases = [Case(f'p{n}', Path(f'p{n}.png'), None, n % 2) for n in range(80)]
    a = data.split_cases(cases, dict(dcfg, label_fraction=0.1))
    b = data.split_cases(cases, dict(dcfg, label_fraction=0.1, label_seed=1))
    ids = lambda group: {c.id for c in group}
    for split in ('train', 'val', 'test'):
        assert ids(a[split]) == ids(b[split])
    assert len(a['labelled']) == len(b['labelled']) and ids(a['labelled']) != ids(b['labelled'])
    assert ids(b['labelled']) <= ids(b['train']) and {c.label for c in b['labelled']} == {0, 1}
