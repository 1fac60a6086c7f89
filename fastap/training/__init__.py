"""Training: contrastive pre-training and listwise-AP fine-tuning (``fastap train``).

Public API::

    from fastap.training import load_config, train, Trainer
    cfg = load_config("configs/mocov2_r50_ap_sfm120k.yaml", ["optim.lr=1e-5"])
    final = train(cfg)                      # output_dir/final.pt, a fastap checkpoint
    train(cfg, resume=True)                 # continue from output_dir/checkpoints/

Building blocks: :func:`multistage_backward` (exact gradients of a listwise loss for batches
larger than memory), :func:`global_ranking_loss` / :func:`gather_with_grad` (AP over the global
batch under torch.distributed), :class:`MoCo`, :func:`info_nce`, :func:`nt_xent`,
:class:`ClassBalancedBatchSampler`, :func:`shuffled_batches`, :func:`read_list_file`,
:func:`build_optimizer` / :func:`build_scheduler` (the trainer's, from an ``optim`` and a
``schedule`` section), :func:`seeded_rng`. For images held in one tensor (``fastap demo``):
:func:`augment_batch` (a whole batch on its device), :func:`swap_surroundings` (another view's
surroundings around a kept centre), :func:`unit_float` (a stage's images converted once)
and :func:`fit_steps` (a plain step loop).
"""

from .config import Config, ConfigError, apply_overrides, config_to_dict, load_config
from .contrastive import (MoCo, ProjectionHead, QueryModel, export_trunk, global_nt_xent,
                          info_nce, nt_xent)
from .data import (ClassBalancedBatchSampler, LabelledImages, RandomBatchSampler, TwoViewImages,
                   build_transform, read_list_file, seeded_rng, sfm120k_list, shuffled_batches)
from .distributed import gather_with_grad, global_ranking_loss, init_distributed
from .in_memory import Augment, augment_batch, fit_steps, swap_surroundings, unit_float
from .multistage import multistage_backward
from .trainer import (CheckpointError, Trainer, build_net, build_optimizer, build_scheduler,
                      config_from_checkpoint, find_checkpoint, lr_factor, train)

__all__ = [
    "Augment",
    "CheckpointError",
    "ClassBalancedBatchSampler",
    "Config",
    "ConfigError",
    "LabelledImages",
    "MoCo",
    "ProjectionHead",
    "QueryModel",
    "RandomBatchSampler",
    "Trainer",
    "TwoViewImages",
    "apply_overrides",
    "augment_batch",
    "build_net",
    "build_optimizer",
    "build_scheduler",
    "build_transform",
    "config_from_checkpoint",
    "config_to_dict",
    "export_trunk",
    "find_checkpoint",
    "fit_steps",
    "gather_with_grad",
    "global_nt_xent",
    "global_ranking_loss",
    "info_nce",
    "init_distributed",
    "load_config",
    "lr_factor",
    "multistage_backward",
    "nt_xent",
    "read_list_file",
    "seeded_rng",
    "sfm120k_list",
    "shuffled_batches",
    "swap_surroundings",
    "train",
    "unit_float",
]
