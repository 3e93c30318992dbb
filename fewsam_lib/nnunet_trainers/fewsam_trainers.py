"""Project nnU-Net trainers, found by nnunetv2 through ``nnUNet_extTrainer`` (set by fewsam_lib.nnunet).

nnunetv2 ships ``nnUNetTrainer_<X>epochs`` (250 iterations per epoch; 1 to over 30 min each on 2 CPU
cores for hippocampus 2d, depending on the batch nnU-Net plans). Two things its trainers do not
fit: tests need a pipeline run in seconds, and the ``cpu`` profile's hours of training on a CPU
must survive an interruption (nnunetv2 checkpoints every 50 epochs only).
"""

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer


class _TrainedOnFoldAll(nnUNetTrainer):
    """No final validation: with fold ``all`` the validation cases are the training cases, and
    fewsam scores the test split with its own metrics (on CT this prediction alone costs minutes
    per volume on a CPU)."""

    def perform_actual_validation(self, save_probabilities: bool = False) -> None:
        self.print_to_log_file(f"{type(self).__name__}: final validation on the training volumes skipped")


class nnUNetTrainer_fewsamSmoke(_TrainedOnFoldAll):
    """One epoch of 10 training and 5 validation iterations: proves the pipeline, learns little."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 1
        self.num_iterations_per_epoch = 10
        self.num_val_iterations_per_epoch = 5


class nnUNetTrainer_fewsam5epochs(_TrainedOnFoldAll):
    """nnunetv2's 5-epoch schedule (``nnUNetTrainer_5epochs``) with a checkpoint after every
    epoch, so an interrupted run resumes (``nnUNetv2_train --c``) instead of starting over."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 5
        self.save_every = 1
