"""Datasets for instance-level retrieval: Revisited Oxford/Paris and the revisitop1m distractors.

``RevisitedDataset(root, "roxford5k")`` reads ``<root>/roxford5k/gnd_roxford5k.pkl`` and names
images in ``<root>/roxford5k/jpg/``; ``.database()`` / ``.queries()`` give torch datasets of
``(image tensor, index)``, queries cropped by their box per the revisitop protocol.
``fastap download`` (:mod:`fastap.download`) fetches the data into this layout.
"""

from .revisitop import (
    DISTRACTORS,
    REVISITED,
    DatabaseImages,
    ImageList,
    QueryImages,
    Revisitop1M,
    RevisitedDataset,
    crop_and_scale,
    image_to_tensor,
    load_gnd,
    load_image,
    scale_factor,
    scaled_size,
)

__all__ = [
    "DISTRACTORS",
    "REVISITED",
    "DatabaseImages",
    "ImageList",
    "QueryImages",
    "Revisitop1M",
    "RevisitedDataset",
    "crop_and_scale",
    "image_to_tensor",
    "load_gnd",
    "load_image",
    "scale_factor",
    "scaled_size",
]
