"""Project nnU-Net trainers, found by nnunetv2 through ``nnUNet_extTrainer`` (set by fewsam_lib.nnunet).

nnunetv2 ships ``nnUNetTrainer_<X>epochs`` (250 iterations per epoch). Three things its trainers do
not fit: tests need a pipeline run in seconds; the ``cpu`` profile's hours of training on a CPU
must survive an interruption (nnunetv2 checkpoints every 50 epochs only); and nnU-Net sizes the
batch to a GPU's memory, so on a CPU an epoch grows with it (2d, full training splits: 292
hippocampus slices, over 30 min per epoch on 2 cores; 154 CT slices of 128x128, longer still:
even at 32 one epoch took 62 min, measured).
"""

import os

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.training.nnUNetTrainer.variants.data_augmentation.nnUNetTrainerNoMirroring import (
    nnUNetTrainerNoMirroring,
)


class _TrainedOnFoldAll(nnUNetTrainer):
    """No final validation: with fold ``all`` the validation cases are the training cases, and
    fewsam scores the test split with its own metrics (on CT this prediction alone costs minutes
    per volume on a CPU). A subclass names its schedule in ``schedule`` (trainer attributes that
    nnU-Net's ``__init__`` sets, e.g. ``num_epochs``)."""

    schedule: dict[str, int] = {}

    def __init__(
        self,
        plans: dict,
        configuration: str,
        fold: int,
        dataset_json: dict,
        device: torch.device = torch.device("cuda"),
    ):
        super().__init__(plans, configuration, fold, dataset_json, device)
        for name, value in self.schedule.items():
            setattr(self, name, value)

    def perform_actual_validation(self, save_probabilities: bool = False) -> None:
        self.print_to_log_file(f"{type(self).__name__}: final validation on the training volumes skipped")

    def save_checkpoint(self, filename: str) -> None:
        """nnU-Net's checkpoint, written beside and then renamed: a run killed while writing keeps
        its previous checkpoint, which ``--c`` can load, instead of a truncated one."""
        partial = f"{filename}.partial"
        super().save_checkpoint(partial)
        if os.path.exists(partial):  # nnU-Net writes nothing on other ranks or with checkpointing off
            os.replace(partial, filename)


class nnUNetTrainer_fewsamSmoke(_TrainedOnFoldAll):
    """One epoch of 2 training and 1 validation iteration: proves the pipeline, learns next to
    nothing. (Ten and five cost the test suite minutes: a spine or CT iteration takes seconds on a
    CPU, and an emulated bf16 one far longer.)"""

    schedule = {"num_epochs": 1, "num_iterations_per_epoch": 2, "num_val_iterations_per_epoch": 1}


class nnUNetTrainer_fewsam5epochs(_TrainedOnFoldAll):
    """nnunetv2's 5-epoch schedule (``nnUNetTrainer_5epochs``) with a checkpoint after every
    epoch, so an interrupted run resumes (``nnUNetv2_train --c``) instead of starting over."""

    schedule = {"num_epochs": 5, "save_every": 1}


class nnUNetTrainer_fewsam5epochsNoMirroring(nnUNetTrainer_fewsam5epochs, nnUNetTrainerNoMirroring):
    """``nnUNetTrainer_fewsam5epochs`` without mirroring, in training and at test time (nnunetv2's
    ``nnUNetTrainerNoMirroring``): for labels that are a left and a right of one organ, which a
    mirrored image swaps. nnU-Net's authors advise it for such left/right mix-ups (MIC-DKFZ/nnUNet
    issues 80 and 869); a short schedule has no time to learn the side from other anatomy
    (docs/protocol.md)."""


class nnUNetTrainer_fewsam5epochsBatch32(nnUNetTrainer_fewsam5epochs):
    """``nnUNetTrainer_fewsam5epochs`` with at most 32 images per batch (nnU-Net's plan otherwise
    unchanged): the ``cpu`` profile's nnU-Net gets the same bounded work per iteration whatever
    the dataset's size. The batch actually used is in ``debug.json`` and the run's ``run.json``."""

    max_batch_size = 32

    def _set_batch_size_and_oversample(self) -> None:
        super()._set_batch_size_and_oversample()
        if self.batch_size > self.max_batch_size:
            self.print_to_log_file(
                f"{type(self).__name__}: batch of {self.batch_size} (nnU-Net's plan) capped at {self.max_batch_size}"
            )
            self.batch_size = self.max_batch_size


class nnUNetTrainer_fewsam5epochsBatch13(nnUNetTrainer_fewsam5epochsBatch32):
    """``nnUNetTrainer_fewsam5epochsBatch32`` with at most 13 images per batch: the batch nnU-Net
    plans for the CT matched budget (158 slices), so the ``cpu`` profile's full CT run sees as many
    training images as its matched run (5 x 250 x 13) and fits a 2-core session (an epoch at 32
    took an hour)."""

    max_batch_size = 13


class nnUNetTrainer_fewsam5epochsBatch13NoMirroring(nnUNetTrainer_fewsam5epochsBatch13, nnUNetTrainerNoMirroring):
    """``nnUNetTrainer_fewsam5epochsBatch13`` without mirroring, in training and at test time: for
    labels told apart by their order along an axis of nnU-Net's plane, which a mirrored image
    reverses (the spine's L1 to L5 along its superior-inferior axis; docs/protocol.md)."""


class _Bf16OnCpu(_TrainedOnFoldAll):
    """The network's forward pass under bf16 autocast on a CPU (nnunetv2 enables mixed precision on
    CUDA only). Outputs come back as fp32, so nnU-Net's losses, its data pipeline and planning are
    untouched; weights, optimiser and checkpoints stay fp32, so prediction loads them as usual.
    Worth it only where the CPU computes bf16 natively (AVX512-BF16 / AMX): elsewhere it is slower."""

    only_where_native = False  # True: bf16 only where the CPU computes it natively, else fp32

    def initialize(self) -> None:
        super().initialize()
        if self.device.type != "cpu":
            return
        if self.only_where_native:
            from fewsam_lib.hardware import native_bf16

            if not native_bf16():
                self.print_to_log_file(f"{type(self).__name__}: fp32, this CPU does not compute bf16 natively")
                return
        forward = self.network.forward

        def bf16_forward(*args, **kwargs):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                output = forward(*args, **kwargs)
            if isinstance(output, (list, tuple)):  # deep supervision: one output per resolution
                return type(output)(o.float() for o in output)
            return output.float()

        from fewsam_lib.methods.nnunet import BF16_LOG_LINE  # the report reads a run's precision by it

        self.network.forward = bf16_forward
        self.print_to_log_file(f"{type(self).__name__}: {BF16_LOG_LINE} on the CPU")


class nnUNetTrainer_fewsam5epochsBatch32Bf16(_Bf16OnCpu, nnUNetTrainer_fewsam5epochsBatch32):
    """``nnUNetTrainer_fewsam5epochsBatch32`` with its forward passes in bf16 on a CPU."""


class nnUNetTrainer_fewsamSmokeBf16(_Bf16OnCpu, nnUNetTrainer_fewsamSmoke):
    """``nnUNetTrainer_fewsamSmoke`` in bf16: the pipeline of the bf16 trainers, for tests."""


class _SearchEnded(Exception):
    """Raised at the end of the epoch after which the search stops: the moving-average pseudo-Dice
    has plateaued, or another epoch would overrun the search's training time."""


class _StopsOnPlateau(_TrainedOnFoldAll):
    """Ends training after the first epoch at which nnU-Net's EMA pseudo-Dice meets fewsam's plateau
    rule (``fewsam_lib.methods.nnunet.plateau_epoch``), with nnU-Net's own end of training (final
    checkpoint, data loaders shut down); ``num_epochs`` is the cap. With ``training_hours`` set, it
    also ends once one more epoch of the mean length so far would take the summed epoch times past
    it: the issue's limit on one run, so a dataset that cannot plateau on this machine shows it in its
    curve instead of running for days. Epoch times come from nnU-Net's own log, so they survive ``--c``."""

    training_hours: float | None = None

    def on_epoch_end(self) -> None:
        from fewsam_lib.methods.nnunet import plateau_epoch

        super().on_epoch_end()
        ema = [float(value) for value in self.logger.get_value("ema_fg_dice", step=None)]  # every epoch's
        if plateau_epoch(ema) is not None:
            self.print_to_log_file(f"{type(self).__name__}: the EMA pseudo Dice plateaued after {len(ema)} epochs")
            raise _SearchEnded
        if self.training_hours is None:
            return
        starts = self.logger.get_value("epoch_start_timestamps", step=None)
        ends = self.logger.get_value("epoch_end_timestamps", step=None)
        spent = [end - start for start, end in zip(starts, ends)]
        if sum(spent) + sum(spent) / len(spent) > self.training_hours * 3600:
            self.print_to_log_file(
                f"{type(self).__name__}: no plateau after {len(ema)} epochs ({sum(spent) / 3600:.2f} h); "
                f"another epoch would pass the {self.training_hours} h limit"
            )
            raise _SearchEnded

    def run_training(self) -> None:
        try:
            super().run_training()
        except _SearchEnded:
            self.on_train_end()


class nnUNetTrainer_fewsamPlateauSearchBf16(_StopsOnPlateau, _Bf16OnCpu, nnUNetTrainer_fewsam5epochsBatch32):
    """The schedule search of the ``schedule`` profile: epochs of 250 iterations of at most 32 images
    in bf16, checkpointed after each, trained on a validation view with nnU-Net's own validation on
    the carved validation cases, until its EMA pseudo-Dice plateaus (at most 60 epochs). The epoch
    it stops at is the ``cpu`` schedule's."""

    schedule = {"num_epochs": 60, "save_every": 1}


class nnUNetTrainer_fewsamPlateauSearchBatch13(_StopsOnPlateau, nnUNetTrainer_fewsam5epochsBatch13):
    """The schedule search for CT: epochs of 250 iterations of at most 13 images (a 128x128 CT epoch
    at 32 took an hour here), checkpointed after each, until the EMA pseudo-Dice plateaus or 2.5
    hours of epochs are spent, the longest one ``cpu`` run may train on this machine (at most 60
    epochs). In fp32: the machines this project is given do not all compute bf16 natively."""

    schedule = {"num_epochs": 60, "save_every": 1}
    training_hours = 2.5


class nnUNetTrainer_fewsamPlateauSearchBatch13NoMirroring(
    nnUNetTrainer_fewsamPlateauSearchBatch13, nnUNetTrainerNoMirroring
):
    """The CT search without mirroring, for the chest X-rays and the spine as their ``cpu`` runs
    train (their labels differ by side or by level): at most 13 images a batch (the X-rays' plan
    has 3), fp32, a checkpoint after each epoch, until the EMA pseudo-Dice plateaus or 2.5 hours of
    epochs are spent."""


class nnUNetTrainer_fewsamCpuPlateau30(_Bf16OnCpu, nnUNetTrainer_fewsam5epochsBatch32):
    """The hippocampus ``cpu`` schedule chosen by the schedule search (profile ``schedule``): 30
    epochs of 250 iterations of at most 32 images, checkpointed after each. On the carved validation
    cases nnU-Net's moving-average pseudo-Dice plateaued after 30 epochs (gain under 0.01 over the
    last 6); here the learning rate decays over those 30. In bf16 where the CPU computes it natively
    (1.8x fp32 there, as in the search, within 0.01 validation pseudo-Dice of fp32 after 5 epochs),
    in fp32 elsewhere (emulated bf16 is many times slower); the log says which, and so does the
    report's schedule table."""

    schedule = {"num_epochs": 30, "save_every": 1}
    only_where_native = True
