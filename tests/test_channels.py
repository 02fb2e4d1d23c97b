"""Channels: MSD 4D and nnU-Net multi-sequence volumes, colour images and MedMNIST arrays, model.in_chans null
(follows the data), checkpoints adapted to any channel count, multi-page TIFF, duplicate case files."""
import json

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import checkpoints
import data
import finetune
import models
import pretrain_targets
from conftest import args, tiny_config
from data import DataError
from test_data import dcfg, save_nifti  # noqa: F401  (fixture)

def two_sequence_msd(root, n=12, shape=(32, 32, 6), seed=0):
    """MSD task with 4D (X, Y, Z, 2) images: sequence 0 is noise, sequence 1 shows the labelled square."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        mask = np.zeros(shape, np.uint8)
        x, y = rng.integers(2, shape[0] - 14, size=2)
        mask[x:x + 12, y:y + 12, 1:-1] = 1
        image = np.stack([rng.normal(100, 20, shape), 50 + 100 * mask + rng.normal(0, 5, shape)], -1)
        save_nifti(root / 'imagesTr' / f'p{i}.nii.gz', image.astype(np.float32))
        save_nifti(root / 'labelsTr' / f'p{i}.nii.gz', mask)
    (root / 'dataset.json').write_text(json.dumps({'labels': {'0': 'background', '1': 'lesion'},
                                                   'modality': {'0': 'T2', '1': 'ADC'}}))
    return root


# ---------------------------------------------------------------------------------------------- multi-sequence volumes

def test_msd_4d_volume_reads_its_sequences_as_channels_in_order(tmp_path, dcfg):
    root = two_sequence_msd(tmp_path / 'T', n=3)
    lps = np.diag([-1.0, -1.0, 1.0, 1.0])                                # reoriented to RAS, channels kept last
    image = nib.load(root / 'imagesTr' / 'p0.nii.gz').get_fdata()
    save_nifti(root / 'imagesTr' / 'p0.nii.gz', image.astype(np.float32), lps)
    save_nifti(root / 'labelsTr' / 'p0.nii.gz', nib.load(root / 'labelsTr' / 'p0.nii.gz').get_fdata().astype(np.uint8),
               lps)
    cases, info = data.prepare(dict(dcfg, layout='msd', root=str(root)), tmp_path)
    assert info['in_chans'] == 2 and info['channels'] == 'null -> 2 (2 channels per image)'
    assert info['intensity'] == 'auto -> percentile (NIfTI volumes, dataset.json modality T2, ADC)'
    arr, _ = data.load(cases[0].image)
    assert arr.shape == (32, 32, 6, 2)
    np.testing.assert_array_equal(data.channels_of(arr)[1], image[::-1, ::-1, :, 1].astype(np.float32))
    ds = data.SliceDataset(cases, dict(dcfg, intensity='percentile'), 32, 2, 'segmentation', train=False)
    item = ds[2]
    assert item['image'].shape == (2, 32, 32)
    lesion = item['mask'].bool()
    assert item['image'][1][lesion].mean() > item['image'][1][~lesion].mean() + 2     # structure in sequence 1 only
    assert abs(item['image'][0][lesion].mean() - item['image'][0][~lesion].mean()) < 1


def test_ct_with_another_sequence_is_windowed_on_the_ct_channel_only(tmp_path, dcfg):
    """dataset.json naming CT and PET: auto windows channel 0 in Hounsfield units and scales channel 1 by its
    percentiles; an explicit list does the same, and a list of another length is refused."""
    root = tmp_path / 'T'
    ct = np.full((16, 16, 4), -1000.0, np.float32)
    ct[4:12, 4:12] = 40.0                                                  # soft tissue in air, HU
    pet = np.zeros((16, 16, 4), np.float32)
    pet[6:10, 6:10] = 5000.0                                               # a hot spot, arbitrary units
    for i in range(3):
        save_nifti(root / 'imagesTr' / f'p{i}.nii.gz', np.stack([ct, pet], -1))
        save_nifti(root / 'labelsTr' / f'p{i}.nii.gz', (pet > 0).astype(np.uint8))
    (root / 'dataset.json').write_text(json.dumps({'labels': {'0': 'background', '1': 'lesion'},
                                                   'modality': {'0': 'CT', '1': 'PET'}}))
    for intensity in ('auto', ['window', 'percentile']):
        cfg = dict(dcfg, layout='msd', root=str(root), intensity=intensity, percentile=[0.0, 100.0])
        cases, info = data.prepare(cfg, tmp_path)
        assert info['modes'] == ['window', 'percentile'] and info['warnings'] == []
        if intensity == 'auto':
            assert info['intensity'] == ("auto -> ['window', 'percentile'] (NIfTI volumes, dataset.json modality CT, "
                                         "PET: window on the CT channels)")
        cfg['intensity'] = info['modes']
        x = data.SliceDataset(cases, cfg, 16, 2, 'segmentation', train=False)[1]['image'] * 0.25 + 0.5   # [0, 1]
        assert x[0, 8, 8].item() == pytest.approx(200 / 400) and x[0, 0, 0].item() == 0     # window [-160, 240]
        assert x[1, 8, 8].item() == pytest.approx(1) and x[1, 0, 0].item() == 0              # percentiles 0, 100
    with pytest.raises(DataError, match=r"data.intensity: 3 modes .* for 2 input channels"):
        data.prepare(dict(dcfg, layout='msd', root=str(root), intensity=['window'] * 3), tmp_path)


def test_nnunet_channel_files_read_in_order(tmp_path, dcfg):
    root = tmp_path / 'T'
    for i in range(2):
        for k, value in enumerate((0.2, 0.8, 0.4)):                      # distinct constants per channel
            save_nifti(root / 'imagesTr' / f'case{i}_{k:04d}.nii.gz', np.full((8, 8, 3), value, np.float32))
        mask = np.zeros((8, 8, 3), np.uint8)
        mask[2:5, 2:5] = 1
        save_nifti(root / 'labelsTr' / f'case{i}.nii.gz', mask)
    dcfg = dict(dcfg, layout='msd', root=str(root), intensity='none')
    cases, info = data.prepare(dcfg, tmp_path)
    assert [c.id for c in cases] == ['case0', 'case1'] and info['in_chans'] == 3
    assert [p.name for p in cases[0].extra_channels] == ['case0_0001.nii.gz', 'case0_0002.nii.gz']
    x = data.SliceDataset(cases, dcfg, 8, 3, 'segmentation', train=False)[0]['image']
    assert [round(v, 4) for v in x.mean((1, 2)).tolist()] == [-1.2, 1.2, -0.4]    # (v - 0.5) / 0.25, in file order
    (root / 'imagesTr' / 'case1_0001.nii.gz').unlink()
    with pytest.raises(DataError, match=r'case1_0002\.nii\.gz: channel files of case case1 are \[0, 2\], without '
                                        r'case1_0001'):
        data.prepare(dcfg, tmp_path)


def test_channel_count_mismatches_are_refused(tmp_path, dcfg):
    root = two_sequence_msd(tmp_path / 'T', n=3)
    dcfg = dict(dcfg, layout='msd', root=str(root))
    with pytest.raises(DataError, match=r"model\.in_chans: 3 does not fit the data's 2 channels per image"):
        data.prepare(dcfg, tmp_path, in_chans=3)
    assert data.prepare(dcfg, tmp_path, in_chans=2)[1]['channels'] == '2 (2 channels per image)'
    with pytest.raises(DataError, match=r'data.std: 3 values for 2 input channels'):   # in_chans null: found here
        data.prepare(dict(dcfg, std=[0.2, 0.2, 0.2]), tmp_path)
    js = json.loads((root / 'dataset.json').read_text())
    (root / 'dataset.json').write_text(json.dumps({**js, 'modality': {'0': 'T2', '1': 'ADC', '2': 'DWI'}}))
    with pytest.raises(DataError, match=r'2 channel\(s\), but dataset.json lists 3 \(T2, ADC, DWI\)'):
        data.prepare(dcfg, tmp_path)
    (root / 'dataset.json').write_text(json.dumps(js))
    grey = nib.load(root / 'imagesTr' / 'p1.nii.gz').get_fdata()[..., 1]
    save_nifti(root / 'imagesTr' / 'p1.nii.gz', grey.astype(np.float32))
    with pytest.raises(DataError, match=r'p0\.nii\.gz: 2 channel\(s\), but .*p1\.nii\.gz has 1'):
        data.prepare(dcfg, tmp_path)


def test_two_sequence_msd_trains_on_the_default_config(tmp_path, cache):
    """Structure only in sequence 2: in_chans follows the data (2) and stage 2 learns it; the run's config.yaml
    holds the resolved value; stage 1 runs on it too."""
    root = two_sequence_msd(tmp_path / 'T')
    cfg = tiny_config(tmp_path, cache, finetune={'epochs': 8, 'batch_size': 8, 'init': 'random'})
    run_dir = finetune.main(args(cfg, 'data.layout=msd', f'data.root={root}'))
    assert yaml.safe_load((run_dir / 'config.yaml').read_text())['model']['in_chans'] == 2
    log = (run_dir / 'log.txt').read_text()
    assert 'model.in_chans null -> 2 (2 channels per image)' in log
    assert 'adapted patch_embed.proj.weight 1->2 channels' in log     # the one grey default backbone, adapted
    assert len(list(cache.glob('backbone-*'))) == 1                      # (no second bootstrap for 2 channels)
    assert json.loads((run_dir / 'metrics.json').read_text())['test']['dice_mean'] > 0.3
    targets = pretrain_targets.main(args(cfg, 'data.layout=msd', f'data.root={root}', 'pretrain.epochs=1'))
    assert torch.load(targets, weights_only=True)['meta']['arch']['in_chans'] == 2
    assert (targets.parent / 'reconstructions.png').stat().st_size > 0    # the first sequence, grey


# -------------------------------------------------------------------------------------------- checkpoint channels

@pytest.mark.parametrize('chans', [1, 2, 4])
def test_three_channel_checkpoint_loads_into_any_channel_count(tmp_path, chans):
    """An official-key 3-channel MAE checkpoint: a grey image repeated to C channels embeds as the 3-channel model
    embeds it repeated 3 times."""
    sizes = dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0)
    cfg = {'model': {'preset': None, 'in_chans': 3, **sizes},
           'mae': {'decoder_embed_dim': 16, 'decoder_depth': 1, 'decoder_num_heads': 2, 'norm_pix_loss': True}}
    torch.manual_seed(0)
    rgb = models.build_mae(cfg).eval()
    torch.save({'model': rgb.state_dict()}, tmp_path / 'mae_rgb.pth')
    model = models.build_mae({**cfg, 'model': {**cfg['model'], 'in_chans': chans}}).eval()
    report = checkpoints.load_checkpoint(model, tmp_path / 'mae_rgb.pth')
    assert f'patch_embed.proj.weight 3->{chans} channels' in report and f'decoder_pred.weight 3->{chans}' in report
    grey = torch.randn(2, 1, 16, 16)
    torch.testing.assert_close(model.patch_embed(grey.repeat(1, chans, 1, 1)), rgb.patch_embed(grey.repeat(1, 3, 1, 1)))
    torch.testing.assert_close(model(grey.repeat(1, chans, 1, 1), noise=torch.rand(2, 16))[0].isfinite(),
                               torch.tensor(True))


# ------------------------------------------------------------------------------------------------ colour and MedMNIST

def official_medmnist(path, images: dict, seed=0):
    """A .npz in the MedMNIST v2 format (medmnist.INFO / np.load of the released files): uint8 <split>_images and
    uint8 <split>_labels of shape (N, 1), for split train / val / test."""
    labels = {s: (np.arange(len(x)) % 2).astype(np.uint8)[:, None] for s, x in images.items()}
    np.savez_compressed(path, **{f'{s}_images': x for s, x in images.items()},
                        **{f'{s}_labels': y for s, y in labels.items()})
    return path


RED, GREEN = (200, 0, 0), (0, 102, 0)          # one luma: PIL 'L' (ITU-R 601-2, rounded) gives 60 for both


def hue_classes(n):
    """(n, 28, 28, 3) RGB: a grey background and a square, red for label 0, green for label 1 (labels i % 2)."""
    x = np.full((n, 28, 28, 3), 80, np.uint8)
    for i in range(n):
        x[i, 8:20, 8:20] = (RED, GREEN)[i % 2]
    return x


def test_medmnist_arrays_read_as_the_medmnist_package_presents_them(tmp_path, dcfg):
    rng = np.random.default_rng(0)
    shapes = {'pathmnist': (4, 28, 28, 3), 'pneumoniamnist': (4, 28, 28), 'grey_hw1': (4, 28, 28, 1),
              'organmnist3d': (4, 28, 28, 28)}
    for name, shape in shapes.items():
        arrays = {s: rng.integers(0, 256, shape, dtype=np.uint8) for s in data.SPLITS}
        path = official_medmnist(tmp_path / f'{name}.npz', arrays)
        cases = data.read_medmnist(path)[0]
        got = data.load(cases[5].image, colour=True)[0]                      # val_images[1]
        want = arrays['val'][1]
        if name == 'pathmnist':                                             # RGB (H, W, 3), channels_of's (H, W, 1, 3)
            np.testing.assert_array_equal(got[:, :, 0], want)
            np.testing.assert_array_equal(data.load(cases[5].image)[0], Image.fromarray(want).convert('L'))
        elif name == 'grey_hw1':                                            # (H, W, 1) is grey (H, W)
            np.testing.assert_array_equal(got, want[..., 0])
        elif name == 'organmnist3d':                                        # (D, H, W) sliced along D
            np.testing.assert_array_equal(got, np.moveaxis(want, 0, -1))
        else:
            np.testing.assert_array_equal(got, want)
    dcfg = dict(dcfg, layout='medmnist', root=str(tmp_path / 'pathmnist.npz'), mean=[0.1, 0.2, 0.3], std=[0.5])
    cases, info = data.prepare(dcfg, tmp_path)
    assert info['in_chans'] == 3 and info['channels'] == 'null -> 3 (colour images)'
    dcfg['intensity'] = info['modes']
    x = data.SliceDataset(cases, dcfg, 28, 3, 'classification', train=False)[0]['image']      # per-channel mean/std
    rgb = torch.from_numpy(np.load(tmp_path / 'pathmnist.npz')['train_images'][0]).permute(2, 0, 1) / 255
    torch.testing.assert_close(x, (rgb - torch.tensor([0.1, 0.2, 0.3]).view(3, 1, 1)) / 0.5)


@pytest.mark.parametrize('channels, rgba', [(4, True), (2, False)])
def test_medmnist_other_channel_counts_are_refused(tmp_path, dcfg, channels, rgba):
    arrays = {s: np.zeros((2, 28, 28, channels), np.uint8) for s in data.SPLITS}
    path = official_medmnist(tmp_path / 'x.npz', arrays)
    with pytest.raises(DataError, match=r'train_images has shape \(2, 28, 28, %d\).*\(N, H, W, 3\) RGB.*%s'
                                        % (channels, r'.*RGBA' if rgba else '')):
        data.prepare(dict(dcfg, layout='medmnist', root=str(path)), tmp_path)


def test_hue_only_classes_differ_in_colour_and_not_in_grey(tmp_path, dcfg):
    path = official_medmnist(tmp_path / 'hue.npz', {s: hue_classes(8) for s in data.SPLITS})
    dcfg = dict(dcfg, layout='medmnist', root=str(path))
    for in_chans in (None, 1):
        cases, info = data.prepare(dcfg, tmp_path, 'classification', in_chans)
        ds = data.SliceDataset(cases[:8], dict(dcfg, intensity=info['modes']), 28, info['in_chans'], 'classification',
                               train=False)
        red, green = ds[0], ds[1]
        assert (red['label'], green['label']) == (0, 1)
        if in_chans is None:                                               # null -> 3: the hue is the class
            assert info['in_chans'] == 3 and not torch.equal(red['image'], green['image'])
            r, g = red['image'][:, 10, 10], green['image'][:, 10, 10]      # inside the square: red, then green
            assert r[0] > g[0] and r[1] < g[1]
        else:                                                              # grey: both classes read the same
            assert info['channels'] == "1: colour images converted to grey (ITU-R 601-2 luma, as PIL 'L')"
            assert torch.equal(red['image'], green['image'])


def test_hue_only_classes_are_learned_in_colour_and_not_in_grey(tmp_path, cache):
    """Stage 2 on the colour file: with in_chans null (3) the classes are learned; read as grey (in_chans 1) every
    image is the same, so every case gets the same prediction and the AUC is exactly chance."""
    path = official_medmnist(tmp_path / 'hue.npz', {'train': hue_classes(32), 'val': hue_classes(8),
                                                   'test': hue_classes(8)})
    cfg = tiny_config(tmp_path, cache, finetune={'epochs': 3, 'batch_size': 8, 'init': 'full',
                                                 'task': 'classification'})
    auc = {}
    for in_chans in ('null', '1'):
        run_dir = finetune.main(args(cfg, 'data.layout=medmnist', f'data.root={path}', f'model.in_chans={in_chans}',
                                     f'finetune.name=hue-{in_chans}'))
        auc[in_chans] = json.loads((run_dir / 'metrics.json').read_text())['test']['auc']
    assert auc['null'] > 0.9 and auc['1'] == 0.5


def test_colour_png_keeps_its_channels_and_grey_saved_as_rgb_stays_grey(tmp_path, dcfg):
    for cls, colour in (('a', RED), ('b', GREEN)):
        for i in range(3):
            img = np.full((16, 16, 3), 80, np.uint8)
            img[4:12, 4:12] = colour
            (tmp_path / 'colour' / cls).mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(tmp_path / 'colour' / cls / f'{i}.png')
            (tmp_path / 'grey' / cls).mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.repeat(img.mean(-1, keepdims=True).astype(np.uint8), 3, -1)).save(
                tmp_path / 'grey' / cls / f'{i}.png')                     # RGB file, equal channels
    colour = dict(dcfg, layout='folder', root=str(tmp_path / 'colour'))
    cases, info = data.prepare(colour, tmp_path)
    assert info['in_chans'] == 3
    colour['intensity'] = info['modes']
    x = data.SliceDataset(cases, colour, 16, 3, 'classification', train=False)[0]['image']
    assert x.shape == (3, 16, 16) and x[0, 8, 8] > x[1, 8, 8]              # red
    assert data.prepare(dict(dcfg, layout='folder', root=str(tmp_path / 'grey')), tmp_path)[1]['in_chans'] == 1
    with pytest.raises(DataError, match=r"model\.in_chans: 2 does not fit the data's colour images; set it to null "
                                        r"\(follows the data\) or 3 \(or 1: grey\)"):
        data.prepare(dict(dcfg, layout='folder', root=str(tmp_path / 'colour')), tmp_path, in_chans=2)


# ------------------------------------------------------------------------------------- multi-page TIFF, duplicates

def test_multi_page_tiff_is_a_volume_of_its_pages(tmp_path, dcfg):
    pages = [np.full((12, 10), 40 * (k + 1), np.uint8) for k in range(3)]
    masks = [np.zeros((12, 10), np.uint8) for _ in range(3)]
    masks[1][3:6, 3:6] = 1
    for name, arrays in (('scan.tif', pages), ('scan_mask.tif', masks)):
        first, *rest = [Image.fromarray(a) for a in arrays]
        first.save(tmp_path / name, save_all=True, append_images=rest)
    arr, affine = data.load(tmp_path / 'scan.tif')
    assert arr.shape == (12, 10, 3) and affine is None
    np.testing.assert_array_equal(arr, np.stack(pages, 2))
    (tmp_path / 'm.csv').write_text('image,mask\nscan.tif,scan_mask.tif\nscan.tif,scan_mask.tif\n')
    case = data.Case('scan', tmp_path / 'scan.tif', tmp_path / 'scan_mask.tif', None)
    ds = data.SliceDataset([case], dict(dcfg, intensity='none'), 16, 1, 'segmentation', train=False)
    assert len(ds) == 3 and ds[1]['mask'].sum() > 0 and ds[0]['mask'].sum() == 0
    Image.fromarray(pages[0]).save(tmp_path / 'odd.tif', save_all=True,
                                   append_images=[Image.fromarray(np.zeros((5, 5), np.uint8))])
    with pytest.raises(DataError, match=r'odd\.tif: its 2 pages differ in size'):
        data.load(tmp_path / 'odd.tif')


def test_msd_refuses_two_files_of_one_case(tmp_path, dcfg):
    root = two_sequence_msd(tmp_path / 'T', n=2)
    nib.save(nib.load(root / 'imagesTr' / 'p1.nii.gz'), root / 'imagesTr' / 'p1.nii')
    with pytest.raises(DataError, match=r'p1\.nii and .*p1\.nii\.gz: two files for case p1'):
        data.prepare(dict(dcfg, layout='msd', root=str(root)), tmp_path)
