"""Project nnU-Net trainers, found by nnunetv2 through ``nnUNet_extTrainer`` (set by fewsam_lib.nnunet).

nnunetv2 ships ``nnUNetTrainer_<X>epochs`` (250 iterations per epoch, ~6 min each on 2 CPU
cores for hippocampus 2d); nothing shorter exists, and tests need a pipeline run in seconds.
"""

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer


class nnUNetTrainer_fewsamSmoke(nnUNetTrainer):
    """One epoch of 10 training and 5 validation iterations: proves the pipeline, learns little."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 1
        self.num_iterations_per_epoch = 10
        self.num_val_iterations_per_epoch = 5
