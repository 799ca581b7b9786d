"""Ensembles: the prediction store, every fusion and stacking method of the papers, and predictors.

`load_predictor(path)` reads a run, a checkpoint or model file, a prediction store or an ensemble
directory into one kind of object (`num_classes`, `predict(files)`, `scores(files)`); `fit_ensemble`
fits a method on a holdout and writes an ensemble directory; `merge_submissions` averages submission
files.
"""

from yt8m.ensemble.ensemble import EnsemblePredictor, fit_ensemble
from yt8m.ensemble.merge import merge_submissions
from yt8m.ensemble.methods import METHODS, build_combiner, fit, method_options
from yt8m.ensemble.predictor import RunPredictor, StorePredictor, load_predictor
from yt8m.ensemble.store import DEFAULT_TOP_K, ScoreStore, StoreWriter, copy_store, data_digest, write_store

__all__ = ["DEFAULT_TOP_K", "METHODS", "EnsemblePredictor", "RunPredictor", "ScoreStore", "StorePredictor",
           "StoreWriter", "build_combiner", "copy_store", "data_digest", "fit", "fit_ensemble", "load_predictor",
           "merge_submissions", "method_options", "write_store"]
