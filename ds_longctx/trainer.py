"""Sequence parallelism for transformers' ``Trainer`` and TRL's ``SFTTrainer`` from the DeepSpeed config.

Change one import and put the ``long_context`` block in the DeepSpeed config the script already passes
(``TrainingArguments(deepspeed=...)`` / ``--deepspeed ds_config.json``)::

    from ds_longctx.trainer import LongContextTrainer      # was: from transformers import Trainer
    trainer = LongContextTrainer(model=model, args=args, train_dataset=..., data_collator=...)

``LongContextSFTTrainer`` does the same for ``trl.SFTTrainer`` (needs the ``[trl]`` extra); any other Trainer
subclass gets it from :func:`~ds_longctx.integration.trainer.trainer_class` or by putting
:class:`~ds_longctx.integration.trainer.LongContextTrainerMixin` first in its bases. The behaviour is
described in :mod:`ds_longctx.integration.trainer`.
"""
from __future__ import annotations

from transformers import Trainer

from .integration.trainer import LongContextTrainerMixin, TrainerSetupError, trainer_class

LongContextTrainer = trainer_class(Trainer, "LongContextTrainer")
LongContextTrainer.__module__ = __name__


def __getattr__(name):
    if name == "LongContextSFTTrainer":  # trl is optional: imported on first use
        from trl import SFTTrainer

        cls = trainer_class(SFTTrainer, "LongContextSFTTrainer")
        cls.__module__ = __name__
        globals()[name] = cls
        return cls
    raise AttributeError(f"module 'ds_longctx.trainer' has no attribute {name!r}")


__all__ = ["LongContextSFTTrainer", "LongContextTrainer", "LongContextTrainerMixin", "TrainerSetupError",
           "trainer_class"]
