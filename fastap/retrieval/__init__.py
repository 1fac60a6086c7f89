"""The evaluation behind ``fastap eval``: model spec → descriptors → scores → mAP.

:func:`evaluate_model` runs the whole protocol of docs/evaluation.md on a Revisited benchmark::

    net      = load_model("torchvision:resnet50")          # or a checkpoint, "moco:PATH", a net
    q, x     = descriptors of the cropped queries and of the database (+ revisitop1m distractors)
    q, x     = whitening (learned or PCA) → DBA on x → αQE of q on x          (all optional)
    scores   = q @ xᵀ   (L2-normalised rows, computed in blocks of database rows)
    results  = evaluate_revisited(scores, gnd)   → Easy/Medium/Hard mAP and mP@1,5,10 (percent)

and returns a JSON-serialisable dict ``{model, dataset, sizes, options, results, queries,
features, timings}``; with ``output=`` it also writes ``<tag>.json``, ``<tag>.txt`` (the printed
table) and ``<tag>_retrieval.png`` (each shown query with its top 10, framed green/red/grey for
positive/negative/junk), where ``<tag>`` is the dataset name (``+1m`` with distractors).

One module per concern: :mod:`~fastap.retrieval.specs` (model specs and loading),
:mod:`~fastap.retrieval.cache` (the descriptor cache and the extraction step),
:mod:`~fastap.retrieval.scoring` (post-processing and scores), :mod:`~fastap.retrieval.report`
(tables) and :mod:`~fastap.retrieval.pipeline` (the steps). Whitening files are read and
written by :mod:`fastap.whitening`.
"""

from ..whitening import load_whitening, parse_whiten, save_whitening
from .pipeline import EvalOptions, evaluate_model
from .report import KAPPAS, format_results, format_summary, format_table
from .scoring import compute_scores
from .specs import (DEFAULT_TORCHVISION_WEIGHTS, FORCED_LAYOUTS, ModelSpec, load_model,
                    parse_model_spec)

__all__ = [
    "DEFAULT_TORCHVISION_WEIGHTS",
    "EvalOptions",
    "FORCED_LAYOUTS",
    "KAPPAS",
    "ModelSpec",
    "compute_scores",
    "evaluate_model",
    "format_results",
    "format_summary",
    "format_table",
    "load_model",
    "load_whitening",
    "parse_model_spec",
    "parse_whiten",
    "save_whitening",
]
