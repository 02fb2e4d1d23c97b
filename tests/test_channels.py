"""Channels: MSD 4D and nnU-Net multi-sequence volumes, colour images and MedMNIST arrays, model.in_chans null
(follows the data), checkpoints adapted to any channel count, multi-page TIFF, duplicate case files."""
import copy
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import data
import finetune
import models
import pretrain_backbone
from conftest import args, tiny_config
from data import DataError

CONFIG = yaml.safe_load((Path(__file__).resolve().parents[1] / 'config.yaml').read_text())


@pytest.fixture
def dcfg():
    return copy.deepcopy(CONFIG['data'])


def save_nifti(path, arr, affine=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(arr), np.eye(4) if affine is None else affine), path)
    return path


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
        data.prepare(copy.deepcopy(dcfg), tmp_path, in_chans=3)
    assert data.prepare(copy.deepcopy(dcfg), tmp_path, in_chans=2)[1]['channels'] == '2 (2 channels per image)'
    js = json.loads((root / 'dataset.json').read_text())
    (root / 'dataset.json').write_text(json.dumps({**js, 'modality': {'0': 'T2', '1': 'ADC', '2': 'DWI'}}))
    with pytest.raises(DataError, match=r'2 channel\(s\), but dataset.json lists 3 \(T2, ADC, DWI\)'):
        data.prepare(copy.deepcopy(dcfg), tmp_path)
    (root / 'dataset.json').write_text(json.dumps(js))
    grey = nib.load(root / 'imagesTr' / 'p1.nii.gz').get_fdata()[..., 1]
    save_nifti(root / 'imagesTr' / 'p1.nii.gz', grey.astype(np.float32))
    with pytest.raises(DataError, match=r'p0\.nii\.gz: 2 channel\(s\), but .*p1\.nii\.gz has 1'):
        data.prepare(copy.deepcopy(dcfg), tmp_path)


def test_two_sequence_msd_trains_on_the_default_config(tmp_path, cache):
    """Structure only in sequence 2: in_chans follows the data (2) and stage 2 learns it; the run's config.yaml
    holds the resolved value."""
    root = two_sequence_msd(tmp_path / 'T')
    cfg = tiny_config(tmp_path, cache, finetune={'epochs': 8, 'batch_size': 8, 'init': 'random'})
    run_dir = finetune.main(args(cfg, 'data.layout=msd', f'data.root={root}'))
    assert yaml.safe_load((run_dir / 'config.yaml').read_text())['model']['in_chans'] == 2
    assert 'model.in_chans null -> 2 (2 channels per image)' in (run_dir / 'log.txt').read_text()
    assert json.loads((run_dir / 'metrics.json').read_text())['test']['dice_mean'] > 0.3


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
    report = pretrain_backbone.load_checkpoint(model, tmp_path / 'mae_rgb.pth')
    assert f'patch_embed.proj.weight 3->{chans} channels' in report and f'decoder_pred.weight 3->{chans}' in report
    grey = torch.randn(2, 1, 16, 16)
    torch.testing.assert_close(model.patch_embed(grey.repeat(1, chans, 1, 1)), rgb.patch_embed(grey.repeat(1, 3, 1, 1)))
    torch.testing.assert_close(model(grey.repeat(1, chans, 1, 1), noise=torch.rand(2, 16))[0].isfinite(),
                               torch.tensor(True))
