"""Inputs that used to be misread without a word: labels that are not class indices, .npz members that are not
arrays, two files for one image, intensities that train on nothing; and targets that record the data they were
pre-trained on, so stage 2 says when it fine-tunes on other data."""
import re
import zipfile
from pathlib import Path

import numpy as np
import torch

import config
import data
import finetune
import pretrain_backbone
import pretrain_targets
import runs
from conftest import args, tiny_config
from data import Case
from test_data import bad, dcfg, medmnist_npz, save_nifti, save_png, write_csv   # noqa: F401 (dcfg: a fixture)


# ---------------------------------------------------------------------------------------------------- labels

def test_medmnist_labels_must_be_non_negative_integers(tmp_path, dcfg):
    def medmnist(name, **arrays):
        return dict(layout='medmnist', root=str(medmnist_npz(tmp_path / name, **arrays)[0]))
    floats = np.array([[0], [1.7], [2], [0], [1], [2]], np.float32)          # 1.7 was read as class 1
    bad(dcfg, r'f.npz: train_labels\[1\] is 1.7; labels are class indices', **medmnist('f.npz', train_labels=floats))
    bad(dcfg, r'n.npz: val_labels\[2\] is -1;', **medmnist('n.npz', val_labels=np.array([[0], [1], [-1], [2]])))
    whole = medmnist('w.npz', train_labels=np.array([[0], [1], [2], [0], [1], [2]], np.float64))
    assert [c.label for c in data.prepare(dict(dcfg, **whole), tmp_path)[0][:6]] == [0, 1, 2, 0, 1, 2]


def test_class_labels_need_every_class_below_the_largest(tmp_path, dcfg):
    for n in range(3):
        save_png(tmp_path / f'{n}.png', np.eye(8) * (40 * n + 9))
    manifest = write_csv(tmp_path / 'm.csv', [['image', 'label'], ['0.png', '0'], ['1.png', '1'], ['2.png', '255']])
    csv = dict(layout='csv', root=str(manifest), intensity='none')
    bad(dcfg, r'2.png \(case 2\): label 255, but no case has label 2, 3, 4, 5, 6, \.\.\.; .*set data.num_classes',
        **csv)                                                               # not a 256-class head
    assert data.prepare(dict(dcfg, **csv, num_classes=256), tmp_path)[1]['num_classes_cls'] == 256   # when meant
    gap = {f'{s}_labels': np.array([[0], [2], [0], [2]]) for s in ('val', 'test')}
    bad(dcfg, r'gap.npz/val_images/1 \(case val_1\): label 2, but no case has label 1;', layout='medmnist',
        root=str(medmnist_npz(tmp_path / 'gap.npz', classes=1, **gap)[0]))


# ---------------------------------------------------------------------------------------------------- files

def test_npz_members_that_are_not_arrays_are_named(tmp_path, dcfg):
    path, npz = medmnist_npz(tmp_path / 'm.npz')
    with zipfile.ZipFile(path, 'a') as z:
        z.writestr('notes', b'downloaded 2024')                             # not a .npy member: np.load gives bytes
    bad(dcfg, r"m.npz: member 'notes' is bytes, not a NumPy array", layout='medmnist', root=str(path))
    np.savez(tmp_path / 'o.npz', **{**npz, 'train_labels': np.array([[0], ['a']] * 3, dtype=object)})
    bad(dcfg, r"o.npz: member 'train_labels' unreadable \(ValueError: Object arrays", layout='medmnist',
        root=str(tmp_path / 'o.npz'))
    np.save(tmp_path / 'p.npy', np.zeros(3))
    (tmp_path / 'p.npy').rename(tmp_path / 'p.npz')
    bad(dcfg, r'p.npz: one array \(ndarray\), not an .npz archive', layout='medmnist', root=str(tmp_path / 'p.npz'))


def test_two_files_for_one_image_or_mask_in_a_class_folder(tmp_path, dcfg):
    folder = dict(layout='folder', root=str(tmp_path), intensity='none')
    for name in ('b0.png', 'b0.jpg', 'b0_mask.png'):
        save_png(tmp_path / 'benign' / name, np.eye(8) * 255)
    bad(dcfg, r'benign/b0.jpg and .*benign/b0.png: two images named b0; keep one', **folder)   # not "no mask"
    (tmp_path / 'benign' / 'b0.jpg').unlink()
    save_png(tmp_path / 'benign' / 'b0_mask.tif', np.eye(8) * 255)
    bad(dcfg, r'benign/b0_mask.png and .*benign/b0_mask.tif: two masks named b0_mask; keep one', **folder)


def test_a_csv_mask_is_shared_only_by_images_of_one_case(tmp_path, dcfg):
    for name in ('t1', 't2', 'other'):
        save_png(tmp_path / f'{name}.png', np.eye(8) * 9)
    save_png(tmp_path / 'm.png', np.eye(8) * 255)
    rows = [['t1.png', 'm.png', 'p1'], ['t2.png', 'm.png', 'p1'], ['other.png', 'm.png', 'p2']]
    two = write_csv(tmp_path / 'two.csv', [['image', 'mask', 'case']] + rows)
    bad(dcfg, r'two.csv lines 2 and 4: one mask .*m.png for cases p1 and p2; give each image its own mask',
        layout='csv', root=str(two), intensity='none')
    one = write_csv(tmp_path / 'one.csv', [['image', 'mask', 'case']] + rows[:2])   # two sequences of patient p1
    assert [c.id for c in data.prepare(dict(dcfg, layout='csv', root=str(one), intensity='none'), tmp_path)[0]] == \
        ['p1', 'p1']


# ---------------------------------------------------------------------------------------------------- intensities

def ct_case(root, name, image):
    """An MSD case of `image` with a mask of its voxels above the lowest value."""
    save_nifti(root / 'imagesTr' / f'{name}.nii.gz', image)
    save_nifti(root / 'labelsTr' / f'{name}.nii.gz', (image > image.min()).astype(np.uint8))


def body(shape=(8, 8, 4)):
    """Air (-1000 HU) around a soft-tissue block (40 HU): a volume that needs no warning."""
    image = np.full(shape, -1000, np.int16)
    image[2:6, 2:6] = 40
    return image


def test_intensity_traps_are_warned_with_the_case_and_the_setting(tmp_path, dcfg):
    root = tmp_path / 'T'
    ct_case(root, 'good', body())
    ct_case(root, 'flat', np.full((8, 8, 4), -1000, np.int16))
    ct_case(root, 'offset', (body() + 1024).astype(np.uint16))             # HU + 1024: every voxel >= 0
    air = np.full((8, 8, 4), -1000, np.int16)
    air[0, 0, 0] = 40                                                        # 255 of 256 voxels below the window
    ct_case(root, 'air', air)
    info = data.prepare(dict(dcfg, layout='msd', root=str(root)), tmp_path)[1]      # auto -> window
    air_w, flat_w, offset_w = info['warnings']                             # in case order; none for 'good'
    assert 'imagesTr/air.nii.gz (case air): 99.6% of the voxels lie outside data.window [-160, 240]' in air_w
    assert 'data.window' in air_w and 'data.intensity: percentile' in air_w
    assert 'imagesTr/flat.nii.gz (case flat): every voxel is -1000: a constant image' in flat_w
    assert 'imagesTr/offset.nii.gz (case offset): no voxel below 0 (min 24)' in offset_w
    assert all(fix in offset_w for fix in ('HU + 1024', 'scl_inter -1024', 'subtract 1024', 'data.intensity: percentile'))
    percentile = data.prepare(dict(dcfg, layout='msd', root=str(root), intensity='percentile'), tmp_path)[1]
    assert len(percentile['warnings']) == 1 and 'case flat' in percentile['warnings'][0]   # HU checks: window only


def test_all_constant_images_are_refused(tmp_path, dcfg):
    for n in range(3):
        save_png(tmp_path / 'a' / f'{n}.png', np.zeros((8, 8)))
    bad(dcfg, r'a/0.png and the others: all 3 images are constant .*nothing to train on', layout='folder',
        root=str(tmp_path), intensity='none')


def test_warnings_are_logged_first_five_then_a_count():
    assert data.warning_lines(['a', 'b']) == ['warning: a', 'warning: b']
    lines = data.warning_lines([str(n) for n in range(8)])
    assert lines == [f'warning: {n}' for n in range(5)] + ['warning: ... and 3 more data warnings']


# ---------------------------------------------------------------------------------------------------- targets' data

def test_fingerprint_is_the_case_list_wherever_it_lies():
    cases = [Case(f'c{n}', Path(f'/a/imagesTr/c{n}.nii.gz'), None, None) for n in range(4)]
    moved = [Case(c.id, Path('/elsewhere') / c.image.name, None, None) for c in reversed(cases)]
    assert data.fingerprint(cases) == data.fingerprint(moved) and len(data.fingerprint(cases)) == 12
    assert data.fingerprint(cases[:3]) != data.fingerprint(cases)


def test_stage2_warns_when_it_fine_tunes_on_other_data_than_the_targets(tmp_path, cache, capsys):
    cfg = tiny_config(tmp_path, cache, finetune={'epochs': 1, 'batch_size': 8})
    targets = pretrain_targets.main(args(cfg))
    saved = torch.load(targets, weights_only=True)
    run_cfg = config.load_config(cfg)
    cases, info = data.prepare(run_cfg['data'], cache)
    trained_on = data.describe(info, data.split_cases(cases, run_cfg['data'])['train'])
    assert saved['meta']['data'] == trained_on and trained_on['root'].startswith('synthetic_ct-v')

    def built(source, *overrides):                            # build_model's log; it loads the targets either way
        run_cfg = config.load_config(cfg, list(overrides))
        finetune.build_model(run_cfg, runs.Run(run_cfg, 'probe'), pretrain_backbone.resolve(run_cfg), 3, 'tpp',
                             source)
        return capsys.readouterr().out
    assert 'warning' not in built(trained_on)                 # the same data: no warning
    del saved['meta']['data']
    torch.save(saved, tmp_path / 'older.pth')                 # a targets file of an older tpp: no record, no warning
    older = built({**trained_on, 'fingerprint': '0' * 12}, f'finetune.targets={tmp_path / "older.pth"}')
    assert 'targets: loaded' in older and 'warning' not in older

    root = tmp_path / 'Hu'                                    # other data: a small MSD task stored as HU + 1024
    for n in range(8):
        ct_case(root, f'c{n}', (body((16, 16, 4)) + 1024).astype(np.uint16))
    log = (finetune.main(args(cfg, 'data.layout=msd', f'data.root={root}')) / 'log.txt').read_text()
    pretrained = f"synthetic_ct {trained_on['root']} ({trained_on['fingerprint']})"
    assert re.search(rf'\nwarning: targets were pre-trained on {re.escape(pretrained)}, fine-tuning on msd '
                     rf'{re.escape(str(root.resolve()))} \([0-9a-f]{{12}}\)\n', log)
    assert log.count('no voxel below 0') == 5 and 'warning: ... and 3 more data warnings\n' in log
