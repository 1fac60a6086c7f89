"""Datasets for instance-level retrieval: Revisited Oxford/Paris and the revisitop1m distractors.

``RevisitedDataset(root, "roxford5k")`` reads ``<root>/roxford5k/gnd_roxford5k.pkl`` and names
images in ``<root>/roxford5k/jpg/``; ``.database()`` / ``.queries()`` give torch datasets of
``(image tensor, index)``, queries cropped by their box per the revisitop protocol.
``fastap download`` (:mod:`fastap.download`) fetches the data into this layout.
"""

from . import synthetic
from .revisitop import *  # noqa: F403  (the names in revisitop.__all__)
from .revisitop import __all__ as _revisitop_all
from .synthetic import LABEL_RULES, PRESETS, SyntheticInfo, generate, read_train_list, synthetic_config

__all__ = [*_revisitop_all, "synthetic", "LABEL_RULES", "PRESETS", "SyntheticInfo", "generate",
           "read_train_list", "synthetic_config"]
