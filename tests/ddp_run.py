"""Run by tests/test_ddp.py in a subprocess: self-compression + Lightning's EMA weight averaging (where Lightning has
it) + guard + C-SWAP + LRP-free fit-end pruning under ``strategy="ddp"`` on CPU (gloo), or in one process. Every rank
writes a fingerprint of what it ended with.

    python tests/ddp_run.py OUT_PREFIX DEVICES
"""

import json
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402

from lightning_xai.callbacks import AttributionPruning, CSWAPPruning, PreservationGuard, SelfCompression  # noqa: E402
from lightning_xai.data import DigitsDataModule  # noqa: E402
from lightning_xai.models import ImageClassifier  # noqa: E402
from lightning_xai.models.nets import SmallResNet  # noqa: E402


def main(out: str, devices: int) -> None:
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    pl.seed_everything(0, workers=True)
    dm = DigitsDataModule(batch_size=64 // devices, seed=0)  # the same global batch in both runs
    model = ImageClassifier(SmallResNet(1, 10, width=8, blocks=1))
    sc = SelfCompression(gamma=0.01, log_every_n_steps=0, remove_every_n_steps=0)
    guard = PreservationGuard(fraction=0.1, lam=0.5, max_drop=0.02, check_every_n_steps=5, cooldown_steps=5)
    cswap = CSWAPPruning(target_ratio=0.3, samples_per_class=4, curves=())
    layers = AttributionPruning(mode="zero", num_batches=1, apply=False)
    averaging = getattr(pl.callbacks, "EMAWeightAveraging", None)  # Lightning >= 2.5
    ema = [averaging(decay=0.9, update_starting_at_step=40)] if averaging is not None else []  # 80 % of 4 epochs
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy="ddp" if devices > 1 else "auto",
        max_epochs=4,
        callbacks=[sc, *ema, guard, cswap, layers],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(model, dm)
    quant = {k: v.tolist() for k, v in model.state_dict().items() if k.endswith((".b", ".e"))}
    state = {k: float(v.double().abs().sum()) for k, v in model.state_dict().items()}
    x, y = dm.dataset("test").tensors
    model.eval()
    with torch.no_grad():
        acc = float((model(x).argmax(1) == y).double().mean())
    record = {
        "rank": trainer.global_rank,
        "world": trainer.world_size,
        "quantizers": quant,
        "state": state,
        "restorations": [r["step"] for r in guard.restorations],
        "plan": cswap.plan,
        "layers_pruned": layers.result["pruned"],
        "params": sum(p.numel() for p in model.parameters()),
        "test_acc": acc,
        # the averaging callback's copy is the final (C-SWAP-pruned) model on every rank, or None without one
        "average_is_model": _same(ema[0]._average_model.module, model) if ema else None,
    }
    Path(f"{out}.{trainer.global_rank}.json").write_text(json.dumps(record))


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
