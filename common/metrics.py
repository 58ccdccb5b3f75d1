"""Classification metrics of SER papers, computed from label indices (no sklearn needed).

- UA, unweighted accuracy = balanced accuracy = mean per-class recall over the classes present
  in the reference labels (the headline SER metric: it is not inflated by the majority class);
- WA, weighted accuracy = plain accuracy;
- macro-F1 over the task's classes (a class never predicted nor present is left out);
- the confusion matrix ``cm[true, predicted]``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np


def confusion_matrix(y_true: Sequence[int], y_pred: Sequence[int], *, n_classes: int) -> np.ndarray:
    """Counts ``cm[t, p]`` of utterances with reference ``t`` predicted as ``p``."""
    true = np.asarray(y_true, dtype=np.int64)
    pred = np.asarray(y_pred, dtype=np.int64)
    if true.shape != pred.shape:
        raise ValueError(f"y_true and y_pred differ in length: {true.shape} vs {pred.shape}")
    for name, arr in (("y_true", true), ("y_pred", pred)):
        if arr.size and (arr.min() < 0 or arr.max() >= n_classes):
            raise ValueError(f"{name} holds a class index outside [0, {n_classes})")
    cm = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(cm, (true, pred), 1)
    return cm


def unweighted_accuracy(cm: np.ndarray) -> float:
    """Mean recall over classes that occur in the reference labels."""
    support = cm.sum(axis=1)
    present = support > 0
    if not present.any():
        return float("nan")
    return float(np.mean(np.diag(cm)[present] / support[present]))


def weighted_accuracy(cm: np.ndarray) -> float:
    """Overall accuracy."""
    total = cm.sum()
    return float(np.trace(cm) / total) if total else float("nan")


def macro_f1(cm: np.ndarray) -> float:
    """Mean F1 over classes that are present or predicted."""
    tp = np.diag(cm).astype(float)
    support = cm.sum(axis=1)
    predicted = cm.sum(axis=0)
    active = (support + predicted) > 0
    if not active.any():
        return float("nan")
    f1 = np.where(active, 2 * tp / np.maximum(support + predicted, 1), 0.0)
    return float(f1[active].mean())


def classification_report(y_true: Sequence[int], y_pred: Sequence[int], *, labels: Sequence[str]) -> dict:
    """UA, WA, macro-F1, per-class recall and the confusion matrix as plain JSON-able values."""
    cm = confusion_matrix(y_true, y_pred, n_classes=len(labels))
    support = cm.sum(axis=1)
    return {
        "n": int(cm.sum()),
        "ua": unweighted_accuracy(cm),
        "wa": weighted_accuracy(cm),
        "macro_f1": macro_f1(cm),
        "recall": {lab: (float(cm[i, i] / support[i]) if support[i] else None) for i, lab in enumerate(labels)},
        "labels": list(labels),
        "confusion": cm.tolist(),
    }


def plot_confusion(cm: np.ndarray | list, *, labels: Sequence[str], path: str | Path, title: str = "") -> Path:
    """Save a row-normalised confusion-matrix heat map with counts as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = np.asarray(cm)
    rows = counts.sum(axis=1, keepdims=True)
    norm = np.divide(counts, rows, out=np.zeros_like(counts, dtype=float), where=rows > 0)
    fig, ax = plt.subplots(figsize=(4.5, 4))
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(counts.shape[0]):
        for j in range(counts.shape[1]):
            ax.text(j, i, str(counts[i, j]), ha="center", va="center", color="white" if norm[i, j] > 0.5 else "black")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
