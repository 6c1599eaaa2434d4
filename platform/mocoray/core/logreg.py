"""Logistic regression on standardised frozen features (scikit-learn): a quick, hyperparameter-free linear score.

The fit is scikit-learn's multinomial `LogisticRegression` (lbfgs, its default C=1) on features standardised
with the training split's mean and standard deviation. The result is also returned as one linear layer on the
raw features (standardisation folded in), so it can be stored and applied like the SGD protocol's fc layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

MAX_ITER = 2000  # lbfgs on standardised features converges in a few hundred; headroom for hard cases


@dataclass
class LogregResult:
    top1: float
    top5: float
    weight: torch.Tensor  # C x D, on raw (unstandardised) features
    bias: torch.Tensor  # C


def fit_logreg(train_f: torch.Tensor, train_y: torch.Tensor, val_f: torch.Tensor, val_y: torch.Tensor,
               seed: int = 0) -> LogregResult:
    """Fit on (train_f, train_y), score top-1 / top-5 on (val_f, val_y)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    x_train = train_f.double().cpu().numpy()
    x_val = val_f.double().cpu().numpy()
    y_train, y_val = train_y.cpu().numpy(), val_y.cpu().numpy()
    scaler = StandardScaler().fit(x_train)
    clf = LogisticRegression(max_iter=MAX_ITER, random_state=seed).fit(scaler.transform(x_train), y_train)
    classes, coef, intercept = clf.classes_, clf.coef_, clf.intercept_
    if coef.shape[0] == 1:  # two classes: scikit-learn keeps one row, the second class's logit against the first
        coef, intercept = np.vstack([np.zeros_like(coef), coef]), np.concatenate([[0.0], intercept])
    scores = scaler.transform(x_val) @ coef.T + intercept
    ranked = classes[np.argsort(-scores, axis=1)[:, : min(5, len(classes))]]
    hit = ranked == y_val[:, None]
    # Fold the standardisation in: w.(x - mu)/sigma + b = (w/sigma).x + (b - w.mu/sigma)
    w = coef / scaler.scale_
    b = intercept - (coef * scaler.mean_ / scaler.scale_).sum(axis=1)
    num_classes = int(max(train_y.max(), val_y.max())) + 1
    weight = torch.zeros(num_classes, x_train.shape[1], dtype=torch.float64)
    bias = torch.full((num_classes,), -1e9, dtype=torch.float64)  # classes absent from training never win
    weight[torch.as_tensor(classes)] = torch.from_numpy(w)
    bias[torch.as_tensor(classes)] = torch.from_numpy(b)
    return LogregResult(float(hit[:, 0].mean()), float(hit.any(axis=1).mean()), weight.float(), bias.float())
