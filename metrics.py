"""The scores of stage 2, computed as MONAI / nnU-Net (Dice) and scikit-learn (ROC AUC, F1) compute them, without
depending on them: NumPy arrays in, floats out."""
import numpy as np


def dice_per_class(pred, gt, num_classes):
    """Dice of each foreground class in one volume. Convention: a class absent from both prediction and ground
    truth is NaN (left out of the averages); absent from the ground truth but predicted scores 0."""
    out = []
    for c in range(1, num_classes):
        p, g = pred == c, gt == c
        denom = p.sum() + g.sum()
        out.append(float('nan') if denom == 0 else 2.0 * (p & g).sum() / denom)
    return out


def segmentation_metrics(dice, num_classes):
    """dice: (cases, K-1) from dice_per_class -> the mean over volumes per class, and over classes."""
    per_class = np.nanmean(dice, 0) if len(dice) else np.full(num_classes - 1, np.nan)
    mean = float(np.nanmean(per_class))
    return {'score': mean, 'dice_mean': mean, **{f'dice_{c + 1}': float(d) for c, d in enumerate(per_class)}}


def auc_ovr(probs, labels):
    """Macro one-vs-rest ROC AUC (Mann-Whitney U with tied ranks averaged), over classes with both outcomes."""
    aucs = []
    for c in range(probs.shape[1]):
        pos = labels == c
        if pos.all() or not pos.any():
            continue
        order = probs[:, c].argsort()
        ranks = np.empty(len(order))
        ranks[order] = np.arange(1, len(order) + 1)
        for value in np.unique(probs[:, c]):                                      # average ranks of ties
            tie = probs[:, c] == value
            ranks[tie] = ranks[tie].mean()
        n_pos, n_neg = pos.sum(), (~pos).sum()
        aucs.append((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))
    return float(np.mean(aucs)) if aucs else float('nan')


def classification_metrics(probs, labels, num_classes):
    """probs (cases, K), labels (cases,) -> AUC (the score; accuracy where no class has both outcomes), accuracy,
    macro F1 and the majority-class floor."""
    pred = probs.argmax(1)
    f1 = []
    for c in range(num_classes):
        hit, truth = pred == c, labels == c
        tp, fp, fn = (hit & truth).sum(), (hit & ~truth).sum(), (~hit & truth).sum()
        if tp + fp + fn:   # a class absent from both labels and predictions is left out (as scikit-learn)
            f1.append(2 * tp / (2 * tp + fp + fn))
    auc = auc_ovr(probs, labels)
    acc = float((pred == labels).mean())
    return {'score': auc if np.isfinite(auc) else acc, 'accuracy': acc, 'macro_f1': float(np.mean(f1)), 'auc': auc,
            'majority_floor': float(np.bincount(labels, minlength=num_classes).max() / len(labels))}
