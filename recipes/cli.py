"""LightningCLI entry point: every recipe as a YAML config (model, data, trainer, callbacks) in recipes/configs/.

    python recipes/cli.py fit --config recipes/configs/self_compress.yaml
    python recipes/cli.py fit --config recipes/configs/cswap.yaml --trainer.max_epochs 2      # a quick run
    python recipes/cli.py fit --config recipes/configs/chain.yaml --trainer.limit_train_batches 4 --trainer.max_epochs 1
    python recipes/cli.py fit --model ImageClassifier --data DigitsDataModule --trainer.callbacks SelfCompression
    python recipes/cli.py fit --print_config --config recipes/configs/chain.yaml   # show every setting

The configs add our callbacks to a plain Lightning Trainer — the same thing you do in your own project. Importing
``lightning_xai`` makes the callbacks, models and data modules known to LightningCLI by their short names. Exports
written to ``{log_dir}/...`` land in the run's versioned log folder.
"""

from __future__ import annotations

import warnings

from lightning.pytorch.cli import LightningCLI

import lightning_xai  # noqa: F401  (registers the callbacks and data modules for short names)
import lightning_xai.models  # noqa: F401

warnings.filterwarnings("ignore", message=".*does not have many workers.*")  # digits fit in memory


def main(args: list[str] | None = None) -> LightningCLI:
    return LightningCLI(
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        args=args,
    )


if __name__ == "__main__":
    main()
