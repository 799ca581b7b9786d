"""Boosting with per-example weights (2017 2nd place; ../shared/reference/models-and-techniques.md, "Training
techniques"): each earlier round's model, given by its prediction store on the training data, weighs the
videos it got wrong more.

Per round k and video n: the error `e_kn = 1 - PERR_kn` (the precision of the video's n best classes, n its
label count), `err_k` the mean error over the training videos, `r_k = ln((1 - err_k) / err_k)`; the weight
`w_n = prod_k exp(alpha * r_k * e_kn)`, renormalised to mean 1 over the training videos and clipped at
`clip` (5). Two passes over the training labels (ids and labels only, never the frames) give `err_k` and the
normaliser before training starts.
"""

from __future__ import annotations

import torch

from yt8m.data import expand_paths


def perr_errors(probabilities: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """`1 - PERR` [B] of each video: 1 - the fraction of positives among its n best classes (n positives; a
    video without positives has PERR 0, as in the metric)."""
    positives = labels.sum(1)  # [B]
    k = int(positives.max()) if len(positives) else 0
    if k == 0:
        return torch.ones(len(labels))
    top = torch.topk(probabilities, k, dim=1).indices  # [B, k]
    hits = labels.gather(1, top) * (torch.arange(k) < positives[:, None])  # within each video's n
    return 1 - hits.sum(1) / positives.clamp(min=1)


class Booster:
    """The per-example weights of a boosting round after the rounds whose stores are `stores`."""

    def __init__(self, stores: str | list[str], train_data, num_classes: int, alpha: float = 1.0,
                 clip: float = 5.0, on_error: str = "raise"):
        from yt8m.ensemble.predictor import dense_labels, labelled_ids
        from yt8m.ensemble.store import ScoreStore

        self.stores = [ScoreStore(path) for path in ([stores] if isinstance(stores, str) else stores)]
        for store in self.stores:
            if store.num_classes != num_classes:
                raise ValueError(f"boost_from: {store.path} scores {store.num_classes} classes, the run {num_classes}")
        self.alpha, self.clip = alpha, clip
        files = expand_paths(train_data)

        def errors():  # [K, B] per batch of the training videos
            for ids, classes in labelled_ids(files, num_classes, on_error=on_error):
                labels = dense_labels(classes, num_classes)
                yield torch.stack([self._errors(store, ids, labels) for store in self.stores])

        totals, count = torch.zeros(len(self.stores), dtype=torch.float64), 0
        for batch in errors():
            totals += batch.double().sum(1)
            count += batch.shape[1]
        if count == 0:
            raise ValueError("boost_from: the training data holds no video")
        self.error_rates = (totals / count).clamp(1e-6, 1 - 1e-6)  # err_k, kept off 0 and 1
        self.rates = torch.log((1 - self.error_rates) / self.error_rates)  # r_k
        # log of the mean of exp(exponent) over the videos, summed in log space: no overflow however large
        self.log_normaliser = float(torch.logsumexp(torch.cat([self._exponent(batch) for batch in errors()]), 0)
                                    - torch.log(torch.tensor(float(count), dtype=torch.float64)))

    @staticmethod
    def _errors(store, ids: list[str], labels: torch.Tensor) -> torch.Tensor:
        from yt8m.ensemble.store import MissingVideosError

        try:
            rows = store.rows_of(ids)
        except MissingVideosError as error:
            raise ValueError(f"boost_from: training video {error.missing[0]} has no score in {store.path}: write "
                             "the earlier round's store on the training data (`yt8m predict RUN --data TRAIN "
                             "--scores STORE`)") from None
        return perr_errors(store.dense(rows), labels)

    def _exponent(self, errors: torch.Tensor) -> torch.Tensor:
        """alpha * sum_k r_k * e_kn [B] in float64, the log of a video's weight before normalising."""
        return self.alpha * (self.rates[:, None] * errors.double()).sum(0)

    def weights(self, ids: list[str], labels: torch.Tensor) -> torch.Tensor:
        """The weights [B] of these training videos (labels [B, C] on the CPU)."""
        errors = torch.stack([self._errors(store, ids, labels) for store in self.stores])  # [K, B]
        return torch.exp(self._exponent(errors) - self.log_normaliser).clamp(max=self.clip).float()


__all__ = ["Booster", "perr_errors"]
