"""The built-in synthetic data sets, written as real files that data.py then reads like any user's data.

    root = synthetic_root('ct', cache_dir)      # CT-like abdomens: an MSD tree (imagesTr/, labelsTr/) + manifest.csv
    root = synthetic_root('mri', cache_dir)     # MRI-like brains: 4D T1/T2/FLAIR volumes in an MSD tree + manifest.csv
    root = synthetic_root('us', cache_dir)      # ultrasound-like breast images in BUSI-like class folders
    root = synthetic_root('ct', cache_dir, site=1)                  # the same task from another site (SITES)
    root = synthetic_root('upstream', cache_dir, n=2000, size=64, medical=0.75)   # the backbone's pre-training images

Each generator is seeded and pure numpy; a folder is written once into run.cache_dir under a name that holds the
generator version, seed, site and sizes, so changed parameters regenerate. This module never imports data.py: the
readers must work on these files exactly as on real ones.
"""
import csv
import json
import os
import shutil
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
from PIL import Image

GENERATOR_VERSION = 2      # bump when a generator changes: the cache folder name changes, so the data is regenerated
SYNTH_SEED = 0
SYNTH_CT = dict(n_cases=64, shape=(96, 96, 28), spacing=(3.6, 3.6, 5.0))
SYNTH_US = dict(n_per_class=100, size=128)
SYNTH_MRI = dict(n_cases=64, shape=(80, 80, 24), spacing=(3.0, 3.0, 6.0))
CT_CLASSES = ['background', 'liver', 'lesion']
CT_KINDS = ['cyst', 'metastasis']
US_CLASSES = ['benign', 'malignant', 'normal']
MRI_SEQUENCES = ['T1', 'T2', 'FLAIR']
MRI_CLASSES = ['background', 'oedema', 'core']
MRI_GRADES = ['high_grade', 'low_grade']

# The scanner of each site, as factors on site 0's; each generator reads all four (docs/data.md):
#   gain        stored intensity scale (CT: the HU calibration; ultrasound: receiver gain; MRI: receive-coil gain)
#   noise       noise (CT and MRI: its standard deviation; ultrasound: speckle contrast, the envelope's exponent)
#   resolution  width of the point-spread function (CT and MRI: partial-volume blur; ultrasound: speckle size)
#   contrast    tissue contrast (CT: the contrast agent's enhancement of liver, spleen, kidneys and aorta;
#               ultrasound and MRI: the exponent of the tissue echogenicity / signal)
# Site 0 is the data everything here was made and tuned on; another site also draws new patients (_case_rng).
SITES = [dict(gain=1.0, noise=1.0, resolution=1.0, contrast=1.0),
         dict(gain=1.1, noise=1.6, resolution=1.6, contrast=0.85),   # an older scanner: noisier, softer, flatter
         dict(gain=0.9, noise=0.6, resolution=0.7, contrast=1.15)]   # a newer one: cleaner, sharper, more contrast


def synthetic_root(kind: str, cache_dir, seed=SYNTH_SEED, site=0, **sizes) -> Path:
    """Folder of a synthetic set ('ct', 'mri', 'us' or 'upstream'; site: an index of SITES, not for 'upstream'),
    written on first use. The name holds the generator version, seed, site (site 0's folder has none) and sizes, so
    changed parameters regenerate and sites never share a folder; a temporary folder renamed at the end means a crash
    leaves no half data set, and of two processes writing at once (torchrun ranks) the first rename wins."""
    writer, defaults = {'ct': (write_synthetic_ct, SYNTH_CT), 'us': (write_synthetic_us, SYNTH_US),
                        'mri': (write_synthetic_mri, SYNTH_MRI), 'upstream': (write_upstream, {})}[kind]
    sizes = {**({'site': site} if site else {}), **defaults, **sizes}
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


def _case_rng(seed, site, *ids):
    """The random generator of one case: site 0 keeps the streams its data sets were made with, another site draws
    new patients (its index appended: never 0, which SeedSequence would read as no entry)."""
    return np.random.default_rng([seed, *ids, site] if site else [seed, *ids])


def _lps_affine(shape, spacing):
    """Affine of a volume stored in LPS-like voxel order (the first two axes flipped, as many DICOM converters
    write) whose canonical (RAS) grid is centred on the origin: stored voxel i is canonical voxel n-1-i."""
    ras = np.diag([*spacing, 1.0])
    ras[:3, 3] = -(np.array(shape) - 1) / 2 * spacing
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[:2, 3] = [shape[0] - 1, shape[1] - 1]
    return ras @ flip


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


def _ct_case(rng, shape, spacing, kind, site):
    """One CT-like abdomen in canonical RAS voxel order: (HU int16 volume, uint8 mask 0 bg / 1 liver / 2 lesion).
    site: a SITES entry."""
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
    liver_hu = rng.uniform(55, 70) * site['contrast']
    hu[liver] = liver_hu
    # distractors of liver-like density: spleen (upper slices), kidneys, vessels, spine, ribs
    spleen = inner & ~liver & ellipse(-0.55 * ax, -0.3 * ay, 0.2 * ax, 0.3 * ay) & (zn > -0.3)
    hu[spleen] = liver_hu + rng.uniform(-5, 10)
    for side in (-1, 1):
        kx, ky = side * 0.36 * ax, -0.48 * ay
        kidney = inner & ~liver & ellipse(kx, ky, 0.13 * ax, 0.2 * ay) & (zn < 0.4)
        hu[kidney] = rng.uniform(140, 180) * site['contrast']
        hu[inner & ~liver & ellipse(kx - side * 3, ky, 0.06 * ax, 0.1 * ay) & (zn < 0.4)] = 40
    aorta = np.broadcast_to(ellipse(-0.08 * ax, -0.42 * ay, 10, 10), shape)
    hu[aorta] = rng.uniform(140, 200) * site['contrast']
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
    hu = _smooth(hu, 0.6 * site['resolution'])  # partial-volume blur of edges
    noise = _smooth(rng.normal(0, 1, shape).astype(np.float32), 1.0 * site['resolution'])  # spatially correlated
    hu += noise / noise.std() * rng.uniform(10, 18) * site['noise']
    return np.clip(np.round(hu * site['gain']), -1024, 3071).astype(np.int16), mask


def write_synthetic_ct(root, n_cases=64, shape=(96, 96, 28), spacing=(3.6, 3.6, 5.0), seed=SYNTH_SEED, site=0):
    """CT-like abdomens as a real MSD tree (imagesTr/, labelsTr/, dataset.json) plus manifest.csv (image,mask,label,
    label = lesion kind). Volumes are stored in LPS-like voxel order, as many DICOM converters do, so reading them
    exercises the reorientation to canonical."""
    cases = (_ct_case(_case_rng(seed, site, i), tuple(shape), np.array(spacing, np.float32), i % 2, SITES[site])
             for i in range(n_cases))
    _write_msd(root, 'ct', cases, CT_KINDS, _lps_affine(shape, spacing), seed, site,
               {'modality': {'0': 'CT'}, 'labels': {str(i): n for i, n in enumerate(CT_CLASSES)}})


# T1, T2, FLAIR signal of each tissue (arbitrary units, 1 = the brightest): the lesion's sub-regions differ only
# across sequences. Oedema has grey matter's T1 and the core's T2 and FLAIR; the core (contrast-enhancing) is told
# from oedema only by T1, and oedema from cortex only by T2 / FLAIR, so segmenting both needs several channels.
MRI_TISSUES = np.array([
    [0.00, 0.00, 0.00],   # 0 air
    [0.90, 0.55, 0.70],   # 1 scalp (fat)
    [0.08, 0.06, 0.06],   # 2 skull
    [0.12, 1.00, 0.08],   # 3 CSF (FLAIR suppresses it)
    [0.50, 0.62, 0.60],   # 4 grey matter
    [0.72, 0.42, 0.45],   # 5 white matter
    [0.50, 0.85, 0.92],   # 6 oedema
    [0.92, 0.85, 0.92],   # 7 core, enhancing
    [0.20, 0.95, 0.55]],  # 8 core, necrotic
    np.float32)


def _mri_case(rng, shape, spacing, grade, site):
    """One brain-like head in canonical RAS voxel order: (int16 (X, Y, Z, 3) T1/T2/FLAIR volume, uint8 mask
    0 background / 1 oedema / 2 core). grade: 0 high (large, lobulated, necrotic, much oedema), 1 low (small, smooth,
    solid, little oedema); the cues overlap on purpose. site: a SITES entry."""
    x = ((np.arange(shape[0]) - (shape[0] - 1) / 2) * spacing[0]).astype(np.float32)[:, None, None]   # mm
    y = ((np.arange(shape[1]) - (shape[1] - 1) / 2) * spacing[1]).astype(np.float32)[None, :, None]
    z = ((np.arange(shape[2]) - (shape[2] - 1) / 2) * spacing[2]).astype(np.float32)[None, None, :]
    a = np.array([rng.uniform(68, 78), rng.uniform(86, 96), rng.uniform(70, 80)], np.float32)  # head semi-axes, mm
    rho = _blob(x / a[0], y / a[1], (z + 10) / a[2], rng, 0.03)          # normalised head radius (< 1 inside)
    fold = _smooth(rng.normal(0, 1, shape).astype(np.float32), 2.0)      # cortical folding
    fold /= fold.std()
    tissue = np.zeros(shape, np.uint8)
    tissue[rho < 1] = 1
    tissue[rho < 0.93] = 2
    tissue[rho < 0.88] = 3
    brain = rho < 0.85 - 0.015 * np.clip(fold, 0, None)                 # sulci: CSF reaching into the cortex
    tissue[brain] = 4
    white = brain & (rho < 0.7 + 0.04 * fold)
    tissue[white] = 5
    for side in (-1, 1):                                                 # lateral ventricles
        vx, vy = side * rng.uniform(7, 11), rng.uniform(-5, 10)
        tissue[((x - vx) / 5) ** 2 + ((y - vy) / rng.uniform(18, 26)) ** 2 + (z / 16) ** 2 < 1] = 3
    # the lesion: a core centred in the white matter of one hemisphere, inside an oedema; both stay in the brain
    # tissue (grey and white matter, not the ventricles)
    parenchyma = tissue >= 4
    inside = np.argwhere(white & (np.abs(x) > 15) & (rho < 0.6))
    cx, cy, cz = (inside[rng.integers(len(inside))] - (np.array(shape) - 1) / 2) * spacing
    r = rng.uniform(18, 30) if grade == 0 else rng.uniform(13, 22)
    stretch = rng.uniform(0.8, 1.25)
    rough = rng.uniform(0.2, 0.4) if grade == 0 else rng.uniform(0.0, 0.12)
    core = parenchyma & (_blob((x - cx) / r, (y - cy) / (r * stretch), (z - cz) / r, rng, rough) < 1)
    spread = r * (rng.uniform(1.35, 1.9) if grade == 0 else rng.uniform(1.1, 1.4))
    oedema = parenchyma & (_blob((x - cx) / spread, (y - cy) / spread, (z - cz) / spread, rng, 0.2) < 1)
    tissue[oedema] = 6
    tissue[core] = 7
    if rng.uniform() < (0.85 if grade == 0 else 0.1):                    # necrotic centre
        tissue[core & (_blob((x - cx) / r, (y - cy) / (r * stretch), (z - cz) / r, rng, 0.1) <
                       rng.uniform(0.3, 0.6))] = 8
    mask = np.where(core, 2, np.where(oedema, 1, 0)).astype(np.uint8)
    # the scanner: per-case tissue signal, contrast, coil sensitivity (bias field), gain, blur, Rician noise
    table = MRI_TISSUES * rng.uniform(0.93, 1.07, MRI_TISSUES.shape).astype(np.float32)
    table[7, 0] *= rng.uniform(0.85, 1.0) if grade == 0 else rng.uniform(0.78, 0.95)  # enhancement
    signal = table ** site['contrast'] * site['gain']
    bias = _smooth(rng.normal(0, 1, shape[:2]).astype(np.float32), shape[0] / 4)[..., None]   # (X, Y, 1)
    bias = 1 + 0.1 * bias / bias.std()
    image = np.stack([_smooth(signal[tissue, k] * bias, 0.7 * site['resolution']) for k in range(3)], -1)
    sigma = 0.025 * site['noise']
    noisy = np.hypot(image + rng.normal(0, sigma, image.shape), rng.normal(0, sigma, image.shape))
    return np.round(noisy * 1000).astype(np.int16), mask


def write_synthetic_mri(root, n_cases=64, shape=(80, 80, 24), spacing=(3.0, 3.0, 6.0), seed=SYNTH_SEED, site=0):
    """MRI-like brains with a lesion, as the MSD BrainTumour task stores them: imagesTr/mri_NNN.nii.gz 4D (X, Y, Z, 3)
    int16, the T1, T2 and FLAIR sequences of one anatomy (dataset.json "modality"), labelsTr/ (0 background,
    1 oedema, 2 core) and manifest.csv (image,mask,label, label = lesion grade). Stored in LPS-like voxel order as
    the CT set."""
    cases = (_mri_case(_case_rng(seed, site, i), tuple(shape), np.array(spacing, np.float32), i % 2, SITES[site])
             for i in range(n_cases))
    _write_msd(root, 'mri', cases, MRI_GRADES, _lps_affine(shape, spacing), seed, site,
               {'modality': dict(enumerate(MRI_SEQUENCES)), 'labels': dict(enumerate(MRI_CLASSES))})


def _write_msd(root, prefix, cases, kinds, stored_affine, seed, site, header):
    """An MSD tree of (image, mask) pairs in canonical voxel order, stored flipped to stored_affine's LPS order:
    imagesTr/<prefix>_NNN.nii.gz, labelsTr/, dataset.json (header: modality and labels) and manifest.csv
    (image,mask,label with case i's label kinds[i % len(kinds)]), which data.read_csv reads."""
    root = Path(root)
    (root / 'imagesTr').mkdir(parents=True)
    (root / 'labelsTr').mkdir()
    rows = []
    for i, (image, mask) in enumerate(cases):
        name = f'{prefix}_{i:03d}.nii.gz'
        for arr, folder in ((image, 'imagesTr'), (mask, 'labelsTr')):
            img = nib.Nifti1Image(np.ascontiguousarray(arr[::-1, ::-1]), stored_affine)
            img.header.set_xyzt_units('mm')
            nib.save(img, root / folder / name)
        rows.append((f'imagesTr/{name}', f'labelsTr/{name}', kinds[i % len(kinds)]))
    at = f', site {site}' if site else ''
    (root / 'dataset.json').write_text(json.dumps({
        'name': f'tpp synthetic {prefix.upper()}',
        'description': f'generated by tpp synthetic.py v{GENERATOR_VERSION}, seed {seed}{at}',
        'tensorImageSize': f'{image.ndim}D', **header, 'numTraining': len(rows), 'numTest': 0,
        'training': [{'image': f'./{r[0]}', 'label': f'./{r[1]}'} for r in rows], 'test': []}, indent=1))
    with open(root / 'manifest.csv', 'w', newline='') as f:
        w = csv.writer(f)
        w.writerow(['image', 'mask', 'label'])
        w.writerows(rows)


def _us_image(rng, kind, size, site):
    """One breast-ultrasound-like B-mode image (uint8) and its lesion mask (bool). kind: 0 benign, 1 malignant,
    2 normal (as BUSI's class folders, sorted); site: a SITES entry."""
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
    echo = echo ** site['contrast'] * np.exp(-rng.uniform(0.3, 1.2) * d)  # attenuation left after gain control
    # speckle: complex Gaussian scatterers blurred by an anisotropic point spread function, envelope detected
    scatter = rng.normal(0, 1, (size, size)) + 1j * rng.normal(0, 1, (size, size))
    psf = (0.8 * site['resolution'], 1.8 * site['resolution'])  # (axial, lateral) in pixels
    env = np.abs(_smooth(scatter.real, psf) + 1j * _smooth(scatter.imag, psf)) ** site['noise']
    b_mode = np.log1p(12 * _smooth(echo, 1.0) * env / env.mean()) / np.log1p(12 * 3)  # log compression
    return np.clip(b_mode * rng.uniform(200, 250) * site['gain'], 0, 255).astype(np.uint8), mask


def write_synthetic_us(root, n_per_class=100, size=128, seed=SYNTH_SEED, site=0):
    """Ultrasound-like 2D images in BUSI-like class folders: <class>/<class>_NNN.png and <class>_NNN_mask.png
    (0/255; all 0 for normal)."""
    root = Path(root)
    for k, cls in enumerate(US_CLASSES):
        (root / cls).mkdir(parents=True)
        for i in range(n_per_class):
            image, mask = _us_image(_case_rng(seed, site, k, i), k, size, SITES[site])
            Image.fromarray(image).save(root / cls / f'{cls}_{i:03d}.png')
            Image.fromarray(mask.astype(np.uint8) * 255).save(root / cls / f'{cls}_{i:03d}_mask.png')


def _dead_leaves(rng, size, yy, xx):
    """Overlapping discs, squares and bars of flat or striped grey with sharp edges (natural-image statistics)."""
    k = int(rng.integers(20, 50))
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
    return np.where(inside.any(0), img, rng.uniform(0, 1))


def _clouds(rng, size, yy, xx):
    """Fractal noise: a random power-law spectrum 1/f^beta (clouds, rock, bark)."""
    f = np.hypot(np.fft.fftfreq(size)[:, None], np.fft.rfftfreq(size)[None, :])
    spectrum = (rng.normal(size=f.shape) + 1j * rng.normal(size=f.shape)) / np.maximum(f, 1 / size) ** rng.uniform(1.5, 2.2)
    return np.fft.irfft2(spectrum, s=(size, size))


def _flow(rng, size, yy, xx):
    """Stripes along a smooth random orientation field (wood grain, fingerprints, fibres)."""
    theta = _smooth(rng.normal(size=(size, size)), size / 6) * size / 4 + rng.uniform(0, np.pi)
    phase = 2 * np.pi * rng.uniform(2, 5) * (xx * np.cos(theta) + yy * np.sin(theta))
    return np.sin(phase) + 0.3 * _smooth(rng.normal(size=(size, size)), 2)


def _cells(rng, size, yy, xx):
    """Fluorescence-microscopy-like: bright round cells of many sizes, some with a nucleus, on a dark background."""
    k = int(rng.integers(5, 40))
    cx, cy = rng.uniform(0, 1, (2, k, 1, 1))
    r = rng.uniform(0.02, 0.09, (k, 1, 1))
    d2 = ((xx - cx) ** 2 + (yy - cy) ** 2) / r ** 2
    body = rng.uniform(0.3, 1, (k, 1, 1)) * np.exp(-d2 ** 2)
    nucleus = rng.uniform(0, 0.8, (k, 1, 1)) * np.exp(-(4 * d2) ** 2)
    return (body + nucleus).max(0) + 0.2 * _smooth(rng.normal(size=(size, size)), size / 8)   # uneven background


def _vessels(rng, size, yy, xx):
    """Branching dark curves on a smooth bright background (angiography-like), traced by smooth random walks."""
    canvas = np.zeros((size, size), np.float32)
    for _ in range(int(rng.integers(2, 7))):
        turn = np.cumsum(np.cumsum(rng.normal(0, 0.003, 400)))            # a curvature that drifts
        angle = rng.uniform(0, 2 * np.pi) + np.clip(turn, -3, 3)
        path = rng.uniform(0, size, 2) + np.cumsum(np.stack([np.cos(angle), np.sin(angle)], 1) * 0.5, 0)
        keep = ((path >= 0) & (path < size)).all(1)
        iy, ix = path[keep].astype(int).T
        np.add.at(canvas, (iy, ix), rng.uniform(0.5, 2))
    vessels = _smooth(canvas, rng.uniform(1, 2))
    return 1 - vessels / max(vessels.max(), 1e-6) + 0.3 * _smooth(rng.normal(size=(size, size)), size / 8)


UPSTREAM_KINDS = [_dead_leaves, _clouds, _flow, _cells, _vessels]


def _texture(rng, size):
    """One natural-texture image of a random kind (no organs, no lesions, no speckle), random contrast, gamma and
    polarity; float in [0, 1]."""
    yy, xx = np.mgrid[0:1:size * 1j, 0:1:size * 1j].astype(np.float32)
    img = UPSTREAM_KINDS[rng.integers(len(UPSTREAM_KINDS))](rng, size, yy, xx)
    lo, hi = np.percentile(img, [1, 99])
    img = np.clip((img - lo) / max(hi - lo, 1e-6), 0, 1) ** rng.uniform(0.6, 1.6)   # contrast and gamma
    return 1 - img if rng.uniform() < 0.3 else img


def _any_site(rng):
    """A scanner drawn around SITES' range, so the upstream corpus spans other sites than the downstream sets'."""
    return dict(gain=rng.uniform(0.85, 1.15), noise=rng.uniform(0.5, 1.8), resolution=rng.uniform(0.6, 1.8),
                contrast=rng.uniform(0.8, 1.2))


def _to_unit(img, lo, hi):
    return np.clip((img.astype(np.float32) - lo) / (hi - lo), 0, 1)


def _medical_slices(rng, kind, k):
    """k unlabelled 2D slices in [0, 1] of one new patient on a random scanner, as the data pipeline would show
    them: 'ct' axial slices of an abdomen in the abdominal window (data.window), 'mri' axial slices of a head in one
    random sequence, percentile-scaled per volume (data.percentile), 'us' k B-mode images of random class, each
    percentile-scaled."""
    site = _any_site(rng)
    if kind == 'us':
        images = [_us_image(rng, rng.integers(3), SYNTH_US['size'], site)[0] for _ in range(k)]
        return [_to_unit(img, *np.percentile(img, [0.5, 99.5])) for img in images]
    if kind == 'ct':
        vol = _ct_case(rng, SYNTH_CT['shape'], np.array(SYNTH_CT['spacing'], np.float32), rng.integers(2), site)[0]
        vol = _to_unit(vol, -160, 240)[None]                                              # (1, X, Y, Z)
    else:
        vol = _mri_case(rng, SYNTH_MRI['shape'], np.array(SYNTH_MRI['spacing'], np.float32), rng.integers(2), site)[0]
        vol = np.moveaxis(vol, -1, 0)                                                     # (3, X, Y, Z)
        vol = np.stack([_to_unit(v, *np.percentile(v, [0.5, 99.5])) for v in vol])
    return [vol[rng.integers(len(vol)), :, :, z] for z in rng.integers(vol.shape[-1], size=k)]


MEDICAL_KINDS = ['ct', 'mri', 'us']


def upstream_textures(n, size, seed):
    """n upstream textures in [0, 1], texture i from its own random stream."""
    return [_texture(np.random.default_rng([seed, i]), size) for i in range(n)]


def upstream_patient(j, kind, k, seed):
    """k slices of upstream patient j (_medical_slices); its random stream never meets the downstream sets' (an
    entry of 10**6)."""
    return _medical_slices(np.random.default_rng([seed, 10 ** 6, j]), kind, k)


def upstream_images(n, size, seed, medical):
    """The backbone's n upstream images (uint8, size x size): a fraction `medical` from the CT, MRI and ultrasound
    generators (equal shares; new patients on random scanners, 8 slices per patient, labels dropped), the rest
    natural textures."""
    n_med = round(n * medical)
    images = upstream_textures(n - n_med, size, seed)
    for j in range(-(-n_med // 8)):
        images += upstream_patient(j, MEDICAL_KINDS[j % len(MEDICAL_KINDS)], min(8, n_med - 8 * j), seed)
    return resized(images, size)


def resized(images, size):
    """[0, 1] images of any side -> uint8 size x size (bilinear)."""
    return [np.asarray(Image.fromarray((img * 255).astype(np.uint8)).resize((size, size), Image.BILINEAR))
            for img in images]


def write_upstream(root, n=2000, size=64, seed=SYNTH_SEED, medical=0.0):
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(upstream_images(n, size, seed, medical)):
        Image.fromarray(image).save(root / f'up_{i:05d}.png')
