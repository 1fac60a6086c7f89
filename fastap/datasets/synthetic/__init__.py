"""A synthetic instance-level retrieval benchmark in the revisitop layout, generated offline.

:func:`generate` draws procedural "landmarks" (facades, towers, gates, domed halls, temples,
castles) and photographs each of them from several viewpoints, then writes

::

    <root>/<name>/gnd_<name>.pkl     imlist, qimlist, gnd (bbx, easy, hard, junk), as revisitop
    <root>/<name>/jpg/<image>.jpg    database images (views + distractors) and query images
    <root>/<name>/train.txt          the labelled training split (format below)
    <root>/<name>/train/<image>.jpg  its images
    <root>/<name>/meta.json          per-image details (instance, family, label, visibility, view)
    <root>/<name>/synthetic.json     version + seed + config + counts (written last)

so that ``RevisitedDataset(root, name)`` and :func:`fastap.evaluation.evaluate_revisited`
work on it unchanged.

**Instances and families.** A family fixes a landmark's style: kind, proportions, wall/roof/window
colours, window shape, wall texture, roof shape and the typical window grid. Its instances share all
of that and differ in a few details: window grid (±1 row/column), the accent colours of door,
band, shutters and flag, the motif (rosette, clock, star, shield, ...) and where it sits, the door
position and the pattern of lit windows. Other instances of a query's family are therefore hard
negatives.

**Views.** Each view renders the landmark into a scene (sky, ground, generic background
buildings, trees, clouds, people, lamp posts) with a perspective/scale/rotation/position drawn for
a target difficulty, foreground occluders (buildings, trees, walls, buses, billboards),
illumination (gain, colour cast, gamma), blur, noise and JPEG compression. The *measured* outcome
labels it, as the Revisited Oxford annotators did (:data:`LABEL_RULES`):

* junk — barely visible: less than 25% of the landmark visible (occluded or out of frame), or
  tiny (its longest side under 22% of the image);
* hard — recognisable but strongly transformed: under 65% visible, or smaller than 45% of the
  image, or rotated more than 18°, or foreshortened (an edge shrunk below 0.68 of its opposite),
  or blurred (σ ≥ 1.2 px at 128 px), or badly lit (gain outside [0.6, 1.5]);
* easy — everything else.

Each query is a separate image of its instance (a clean view, object fully visible, with clutter
around it) whose ``bbx`` is the box of the landmark's pixels. Distractors contain no benchmark
instance (clutter, or buildings that are new instances of benchmark or fresh families).
Database names are opaque (``im00000``...) and ``imlist`` is shuffled.

**Training split.** Instances of other families (drawn from the same style distribution, never a
benchmark instance) seen in easy and hard views. ``train.txt`` has one line per image::

    <path> <instance_id>

separated by one space, ``<path>`` relative to the folder holding ``train.txt`` (e.g.
``train/t0012_03.jpg``, no spaces), ``<instance_id>`` an integer in
``0 .. train_instances - 1`` (instances numbered family by family). :func:`read_train_list`
parses it.

Everything is a deterministic function of ``seed`` and the config (per-image random streams
derived from ``(seed, role, indices)``), so identical arguments give byte-identical files on the
same numpy/Pillow. A folder whose ``synthetic.json`` records the same version, seed and config is
reused; generation happens in a temporary folder renamed into place, so an interrupted run
leaves nothing half-written.
"""

from .build import SyntheticInfo, generate, read_train_list
from .config import LABEL_RULES, PRESETS, VERSION, synthetic_config

__all__ = [
    "LABEL_RULES",
    "PRESETS",
    "VERSION",
    "SyntheticInfo",
    "generate",
    "read_train_list",
    "synthetic_config",
]
