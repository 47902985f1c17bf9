"""LightningCLI entry point: every recipe as a YAML config (model, data, trainer, callbacks) in recipes/configs/.

    python recipes/cli.py fit --config recipes/configs/self_compress.yaml
    python recipes/cli.py fit --config recipes/configs/cswap.yaml --trainer.max_epochs 5
    python recipes/cli.py fit --print_config --config recipes/configs/chain.yaml   # show every setting

The configs add our callbacks to a plain Lightning Trainer — the same thing you do in your own project.
"""

from __future__ import annotations

from lightning.pytorch.cli import LightningCLI


def main(args: list[str] | None = None) -> LightningCLI:
    return LightningCLI(
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        args=args,
    )


if __name__ == "__main__":
    main()
